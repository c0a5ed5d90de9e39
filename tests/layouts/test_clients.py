"""Each layout's client cells: the README's layout x engine table is theirs, and each cell says its evidence."""

from __future__ import annotations

from pathlib import Path


def test_the_readme_table_is_the_clients_table():
    from fp8q.layouts import clients, layouts

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert render_client_table() in readme, render_client_table()
    cells = [cell for layout in layouts() for table in (layout.vllm, layout.transformers) for cell in table.values()]
    assert all(c.evidence is not clients.Evidence.NONE or c.outcome is clients.Outcome.NOT_CHECKED for c in cells)


def render_client_table() -> str:
    """The README's layout x engine table, from each layout's cells (print it to update the README)."""
    from fp8q.layouts import clients, layouts

    marks = {clients.Evidence.TEST: "[t]", clients.Evidence.ENGINES: "[e]", clients.Evidence.SOURCE: "[s]"}

    def cell(c: clients.Cell) -> str:
        why = f": {c.why}" if c.why else ""
        return f"{c.outcome.value}{why} {marks.get(c.evidence, '')}".strip()

    rows = ["| layout | vLLM, dense | vLLM, MoE | transformers, dense | transformers, MoE |", "|---|---|---|---|---|"]
    for layout in layouts():
        cells = [layout.vllm[False], layout.vllm[True], layout.transformers[False], layout.transformers[True]]
        rows.append(f"| {layout.name} | " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(rows)
