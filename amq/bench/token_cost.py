"""What a method costs in calibration tokens forwarded, the unit that compares searches of different
budgets (true evaluations alone hide how many tokens each one forwards, and the sensitivity table).

A true evaluation forwards the calibration windows once; the sensitivity table forwards its windows
once per probe (each linear, or unit of linears, at the low width) plus the all-high baseline, and
estimated middle widths (`search.sensitivity_widths=estimated`) the calibration windows once more. A
probe's pass starts at the probed block (`amq.search.sensitivity.measure`), so a probe costs less
compute than a full forward of as many tokens: the count is of tokens, not of FLOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from amq.search.sensitivity import SensitivityTable


def sensitivity_probes(table: SensitivityTable) -> int:
    """The forwards that made `table`: one per probed unit and width, plus each width's all-highest baseline."""
    return table.probes


@dataclass(frozen=True)
class TokenCost:
    per_evaluation: int  # calibration tokens of one true evaluation (windows x window length)
    probes: int  # sensitivity forwards: one per probed unit, plus the baseline
    per_probe: int  # calibration tokens of one probe (the sensitivity windows)
    estimate: int = 0  # tokens of the pass that estimated the table's middle widths (`SensitivityTable.estimate_tokens`)

    @property
    def sensitivity(self) -> int:
        return self.probes * self.per_probe + self.estimate

    def of(self, true_evaluations: int, uses_table: bool) -> int:
        """Tokens forwarded by `true_evaluations` evaluations, plus the table if the method used it."""
        return true_evaluations * self.per_evaluation + (self.sensitivity if uses_table else 0)

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "sensitivity": self.sensitivity}
