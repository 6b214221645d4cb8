"""The state graph drawn as SVG, laid out here: no Graphviz, no browser, no dependency.

``jorb graph RUNFILE --format svg > graph.svg`` and the HTML report use it::

    svg = jorb.svg.draw(jorb.report.graph(jorb.Run.load("runs/migrate.json")))

A small layered layout, left to right: the edges (transitions and kicks) that close a cycle are
turned round, each state goes one column right of the furthest state leading into it, and a few
sweeps order each column by where its neighbours sit, so that edges cross less. Edges that
go forward are curves between columns; the ones that go back (a retry loop, a redrive) arc
below. Lanes are blue, terminal states green, states that jobs were given up into red; kicks are
dashed blue, give-ups red, redrives dotted orange.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from .report import Graph, seconds

__all__ = ["draw"]

NODE_HEIGHT = 44
H_GAP = 80
V_GAP = 34
MARGIN = 24
#: Average width of a character at the 13px font used, to size boxes without measuring text.
CHAR = 7.4

_COLOURS = {
    "exec": "#555555",
    "gave_up": "#c62828",
    "kick": "#1565c0",
    "redrive": "#ef6c00",
}


@dataclass(slots=True)
class _Box:
    name: str
    rank: int
    x: float = 0.0
    y: float = 0.0
    width: float = 0.0


def draw(g: Graph, *, element_id: str = "jorb-graph") -> str:
    """The graph as one standalone ``<svg>`` element (states with their jobs now and median
    exec time; edges with counts)."""
    boxes = _layout(g)
    width = max((b.x + b.width for b in boxes.values()), default=0) + MARGIN
    bottom = max((b.y + NODE_HEIGHT for b in boxes.values()), default=0)
    out: list[str] = []
    labels: list[str] = []
    taken = [(b.x, b.y, b.x + b.width, b.y + NODE_HEIGHT) for b in boxes.values()]
    loops = 0
    for kind, a, b, label in _edges(g):
        curve, below = _route(boxes[a], boxes[b], kind, loops)
        loops += below
        colour = _COLOURS[kind]
        dash = {"kick": ' stroke-dasharray="7 4"', "redrive": ' stroke-dasharray="2 4"'}.get(
            kind, ""
        )
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = curve
        path = f"M{x0:.1f},{y0:.1f} C{x1:.1f},{y1:.1f} {x2:.1f},{y2:.1f} {x3:.1f},{y3:.1f}"
        out.append(
            f'<g class="edge {kind}" data-from={quoteattr(a)} data-to={quoteattr(b)}>'
            f"<title>{escape(f'{a} → {b}: {label}')}</title>"
            f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.6"{dash} '
            f'marker-end="url(#{element_id}-{kind})"/></g>'
        )
        labels.append(_label(_place(curve, label, taken), label, colour))
    out.extend(labels)  # over every edge, so that no line crosses a count
    height = bottom + MARGIN + 26 * loops
    errors = g.error_states
    for name, terminal, jobs in g.nodes:
        out.append(_node(boxes[name], terminal, jobs, name in errors, g))
    markers = "".join(
        f'<marker id="{element_id}-{kind}" viewBox="0 0 10 10" refX="9" refY="5" '
        f'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
        f'<path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>'
        for kind, colour in _COLOURS.items()
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" id={quoteattr(element_id)} '
        f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'font-family="Helvetica, Arial, sans-serif" font-size="13">'
        f"<defs>{markers}</defs>{''.join(out)}</svg>\n"
    )


# -- layout ------------------------------------------------------------------------------------


def _layout(g: Graph) -> dict[str, _Box]:
    names = [name for name, _, _ in g.nodes]
    order = {name: i for i, name in enumerate(names)}
    links = sorted(
        {(a, b) for a, b in [*g.edges, *g.kicks] if a != b and a in order and b in order},
        key=lambda e: (order[e[0]], order[e[1]]),
    )
    forward = _acyclic(names, links)
    rank = dict.fromkeys(names, 0)
    for _ in names:  # longest path from the sources (the graph is small: plain relaxation)
        changed = False
        for a, b in forward:
            if rank[b] < rank[a] + 1:
                rank[b], changed = rank[a] + 1, True
        if not changed:
            break
    linked = {n for edge in links for n in edge}
    last = max(rank.values(), default=0)
    terminal = {name: t for name, t, _ in g.nodes}
    for name in names:  # a terminal state nothing reached yet goes with the other ends
        if name not in linked and terminal.get(name):
            rank[name] = last
    columns: list[list[str]] = [[] for _ in range(max(rank.values(), default=0) + 1)]
    for name in names:
        columns[rank[name]].append(name)
    _order_columns(columns, forward)
    boxes = {name: _Box(name, rank[name]) for name in names}
    for name, box in boxes.items():
        box.width = max(len(name) * (CHAR + 0.6), len(_detail(g, name)) * CHAR) + 20
    tallest = max((len(c) for c in columns), default=0) * (NODE_HEIGHT + V_GAP)
    x = float(MARGIN)
    for column in columns:
        width = max((boxes[n].width for n in column), default=0)
        top = MARGIN + (tallest - len(column) * (NODE_HEIGHT + V_GAP)) / 2
        for index, name in enumerate(column):
            box = boxes[name]
            box.x = x + (width - box.width) / 2
            box.y = top + index * (NODE_HEIGHT + V_GAP)
        x += width + H_GAP
    return boxes


def _acyclic(names: list[str], links: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The links with those that close a cycle (found depth-first) turned round."""
    out: dict[str, list[str]] = {n: [] for n in names}
    for a, b in links:
        out[a].append(b)
    state: dict[str, int] = {}  # 1: on the path, 2: done
    back: set[tuple[str, str]] = set()

    def visit(start: str) -> None:
        stack = [(start, iter(out[start]))]
        state[start] = 1
        while stack:
            node, rest = stack[-1]
            nxt = next(rest, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                back.add((node, nxt))
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(out[nxt])))

    for name in names:
        if name not in state:
            visit(name)
    return [(b, a) if (a, b) in back else (a, b) for a, b in links]


def _order_columns(columns: list[list[str]], links: list[tuple[str, str]]) -> None:
    """A few barycentre sweeps, right then left, keeping declaration order among ties."""
    for sweep in range(4):
        position = {n: i for column in columns for i, n in enumerate(column)}
        rightward = sweep % 2 == 0
        for column in columns[1:] if rightward else columns[-2::-1]:
            members = set(column)
            centres = {}
            for name in column:
                if rightward:
                    near = [position[a] for a, b in links if b == name and a not in members]
                else:
                    near = [position[b] for a, b in links if a == name and b not in members]
                centres[name] = sum(near) / len(near) if near else position[name]
            column.sort(key=centres.__getitem__)
            position.update({n: i for i, n in enumerate(column)})


# -- drawing -----------------------------------------------------------------------------------


def _edges(g: Graph) -> list[tuple[str, str, str, str]]:
    """``(kind, from, to, label)`` for every edge to draw."""
    edges = []
    for (a, b), count in g.edges.items():
        gave_up = g.gave_up.get((a, b), 0)
        if gave_up == count:
            edges.append(("gave_up", a, b, f"{count:,} gave up"))
        elif gave_up:
            edges.append(("gave_up", a, b, f"{count:,} ({gave_up:,} gave up)"))
        else:
            edges.append(("exec", a, b, f"{count:,}"))
    edges += [("kick", a, b, f"kick {n:,}") for (a, b), n in g.kicks.items()]
    edges += [("redrive", a, b, f"redrive {n:,}") for (a, b), n in g.redrives.items()]
    return edges


Point = tuple[float, float]
Curve = tuple[Point, Point, Point, Point]


def _route(a: _Box, b: _Box, kind: str, loops: int) -> tuple[Curve, int]:
    """An edge's cubic curve, and whether it arcs below the columns (1, else 0)."""
    shift = {"kick": 7.0, "redrive": -7.0}.get(kind, 0.0)  # two edges between the same states
    if b.rank > a.rank:
        x0, y0 = a.x + a.width, a.y + NODE_HEIGHT / 2 + shift
        x3, y3 = b.x, b.y + NODE_HEIGHT / 2 + shift
        bend = max(40.0, (x3 - x0) / 2)
        return ((x0, y0), (x0 + bend, y0), (x3 - bend, y3), (x3, y3)), 0
    if a is b:  # a loop onto itself, above the box
        x0, x3, y = a.x + a.width * 0.35, a.x + a.width * 0.65, a.y
        return ((x0, y), (x0 - 20, y - 40), (x3 + 20, y - 40), (x3, y)), 0
    # Backwards, or within a column: under both boxes, lower for each such edge.
    x0, y0 = a.x + a.width / 2 + shift, a.y + NODE_HEIGHT
    x3, y3 = b.x + b.width / 2 + shift, b.y + NODE_HEIGHT
    depth = max(y0, y3) + 30 + 18 * loops
    return ((x0, y0), (x0, depth), (x3, depth), (x3, y3)), 1


def _place(curve: Curve, text: str, taken: list[tuple[float, float, float, float]]) -> Point:
    """Where on the curve the label goes: the middle, or the nearest point along it where it
    covers no state and no other label; the spot is then taken."""
    half = (len(text) * 6.4 + 8) / 2
    first = None
    for t in (0.5, 0.38, 0.62, 0.28, 0.72, 0.2, 0.8):
        u = 1 - t
        x, y = (
            u**3 * p0 + 3 * u * u * t * p1 + 3 * u * t * t * p2 + t**3 * p3
            for p0, p1, p2, p3 in zip(*curve, strict=True)
        )
        box = (x - half, y - 9, x + half, y + 7)
        first = first or (x, y, box)
        if not any(_overlap(box, other) for other in taken):
            taken.append(box)
            return x, y
    assert first is not None
    taken.append(first[2])
    return first[0], first[1]


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _label(where: Point, text: str, colour: str) -> str:
    x, y = where
    width = len(text) * 6.4 + 8
    return (
        f'<rect x="{x - width / 2:.1f}" y="{y - 9:.1f}" width="{width:.1f}" height="16" '
        f'rx="3" fill="white" fill-opacity="0.85"/>'
        f'<text x="{x:.1f}" y="{y + 3:.1f}" text-anchor="middle" font-size="11" '
        f'fill="{colour}">{escape(text)}</text>'
    )


def _detail(g: Graph, name: str) -> str:
    jobs = next((n for state, _, n in g.nodes if state == name), 0)
    timing = g.timings.get(name)
    text = f"{jobs:,} jobs"
    return text + (f" · median {seconds(timing.median)}" if timing is not None else "")


def _node(box: _Box, terminal: bool | None, jobs: int, error: bool, g: Graph) -> str:
    if error:
        fill, stroke = "#fde0dc", "#c62828"
    elif terminal:
        fill, stroke = "#e8f5e9", "#2e7d32"
    elif terminal is None:
        fill, stroke = "#eeeeee", "#757575"
    else:
        fill, stroke = "#e3f2fd", "#1565c0"
    kind = "error" if error else "terminal" if terminal else "lane"
    centre = box.x + box.width / 2
    return (
        f'<g class="node {kind}" data-state={quoteattr(box.name)} data-jobs="{jobs}">'
        f"<title>{escape(box.name)}</title>"
        f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" height="{NODE_HEIGHT}" '
        f'rx="{14 if terminal else 4}" fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>'
        f'<text x="{centre:.1f}" y="{box.y + 18:.1f}" text-anchor="middle" font-weight="bold" '
        f'fill="#212121">{escape(box.name)}</text>'
        f'<text x="{centre:.1f}" y="{box.y + 35:.1f}" text-anchor="middle" font-size="11" '
        f'fill="#424242">{escape(_detail(g, box.name))}</text></g>'
    )
