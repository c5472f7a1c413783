"""An estimate's result: one row per step, the run's totals and what they rest on, as text
(``item-embeddings estimate``) or JSON (``--json``). The model is in :mod:`.estimate`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .estimate_inputs import Choices
from .estimate_rates import GUESSES, RATES_FILE, Quantity


@dataclass(frozen=True)
class Step:
    """One row of the estimate: a step's tasks, their duration and what they cost."""

    step: str
    machine: str
    tasks: int
    items_per_task: int
    task_s: float
    wall_s: float
    machine_hours: float
    cost_usd: float


@dataclass
class Estimate:
    """The steps' rows, the run's totals, and what the numbers rest on."""

    choices: Choices
    steps: list[Step]
    wall_s: float
    cost_usd: float
    storage_gb: float
    storage_usd_month: float
    assumptions: list[str] = field(default_factory=list)
    rates_used: list[Quantity] = field(default_factory=list)
    rates_origin: str = RATES_FILE
    warnings: list[str] = field(default_factory=list)
    image_rates: dict[str, float] = field(default_factory=dict)  # images/s per worker stage

    def image_worker(self) -> tuple[str, float]:
        """(the stage that bounds an image worker, its images/s)."""
        bound = min(self.image_rates, key=self.image_rates.get)
        return bound, self.image_rates[bound]

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-able data (``estimate --json``)."""
        return {"choices": self.choices.to_dict(),
                "steps": [asdict(s) for s in self.steps],
                "total": {"wall_s": self.wall_s, "cost_usd": self.cost_usd,
                          "machine_hours": sum(s.machine_hours for s in self.steps)},
                "storage": {"gb": self.storage_gb, "usd_per_month": self.storage_usd_month},
                "image_worker": {"images_per_s": self.image_worker()[1],
                                 "bound_by": self.image_worker()[0],
                                 "stages_images_per_s": self.image_rates},
                "warnings": self.warnings,
                "assumptions": self.assumptions,
                "rates_used": [asdict(q) for q in self.rates_used],
                "rates_file": self.rates_origin}

    def format(self) -> str:
        """The table, the warnings, the assumptions and the rates used, as text."""
        c = self.choices
        header = ("step", "machine", "tasks", "items/task", "task", "wall", "machine-h", "cost")
        rows = [(s.step, s.machine, str(s.tasks) if s.tasks else "",
                 f"{s.items_per_task:,}" if s.tasks else "",
                 duration(s.task_s) if s.tasks else "", duration(s.wall_s) if s.tasks else "",
                 f"{s.machine_hours:.2f}" if s.tasks else "", money(s.cost_usd))
                for s in self.steps]
        rows.append(("total (critical path)", "", "", "", "", duration(self.wall_s),
                     f"{sum(s.machine_hours for s in self.steps):.2f}", money(self.cost_usd)))
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
        numeric = {2, 3, 4, 5, 6, 7}
        lines = [c.describe(), ""]
        for row in (header, *rows):  # starts with a step name, ends with a cost: no padding
            lines.append("  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                                   for i, (v, w) in enumerate(zip(row, widths))))
        bound, rate = self.image_worker()
        stages = ", ".join(f"{k} {v:,.0f}" for k, v in self.image_rates.items())
        lines += ["", f"image worker: {rate:,.0f} images/s, bound by {bound} ({stages})",
                  f"storage: {self.storage_gb:.2f} GB of outputs and intermediates, "
                  f"{money(self.storage_usd_month)} per month until deleted", ""]
        if self.warnings:
            lines += ["warnings:", *(f"  ! {w}" for w in self.warnings), ""]
        lines += [
                  "assumptions:", *(f"  - {a}" for a in self.assumptions), "",
                  f"measured rates and published prices used ({self.rates_origin}):",
                  *(f"  - {q.line()}" for q in self.rates_used if q.basis not in GUESSES)]
        return "\n".join(lines)


def duration(seconds: float) -> str:
    """``42 s``, ``10.0 min`` or ``3 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def money(usd: float) -> str:
    """Dollars: three decimals below $1, cents above."""
    return f"${usd:.3f}" if usd < 1 else f"${usd:,.2f}"
