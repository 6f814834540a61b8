"""Agreement between annotators, chance-corrected: Cohen's kappa for two, Krippendorff's alpha for any number.

Both compare how often annotators agree with how often they would by chance, so 1 is perfect agreement, 0 is what
chance alone gives, and a negative value is systematic disagreement. The labels are nominal (a, b, tie); a skip is a
missing value, not a label.

* Cohen's kappa (Cohen 1960) for two annotators, over the items both labelled: ``(p_o - p_e) / (1 - p_e)`` with
  `p_o` the share of those items they agree on and `p_e` the agreement their own label frequencies give by chance.
* Krippendorff's alpha (Krippendorff 2011, "Computing Krippendorff's alpha-reliability"), nominal, for any number
  of annotators and items labelled by any number of them: ``1 - D_o / D_e`` from the coincidence matrix of all
  pairable values (items with at least two labels).

Either is None when it is undefined: no item with two labels, or every label the same (no variation for chance
agreement to be measured against).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional


def cohen_kappa(pairs: Iterable[tuple[str, str]]) -> Optional[float]:
    """Cohen's kappa of (label of annotator 1, label of annotator 2) per item."""
    pairs = list(pairs)
    n = len(pairs)
    if n == 0:
        return None
    first, second = Counter(p[0] for p in pairs), Counter(p[1] for p in pairs)
    p_o = sum(x == y for x, y in pairs) / n
    p_e = sum(first[k] * second[k] for k in first) / (n * n)
    if p_e == 1:
        return None
    return (p_o - p_e) / (1 - p_e)


def krippendorff_alpha(units: Iterable[list[str]]) -> Optional[float]:
    """Krippendorff's alpha (nominal) of the labels given to each unit (item), one list per unit."""
    coincidence: Counter = Counter()
    for values in units:
        m = len(values)
        if m < 2:
            continue  # a value no other annotator gave to the same unit cannot be paired
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    coincidence[c, k] += 1 / (m - 1)
    totals: Counter = Counter()
    for (c, _), w in coincidence.items():
        totals[c] += w
    n = sum(totals.values())
    if n <= 1:
        return None
    observed = sum(w for (c, k), w in coincidence.items() if c != k)
    expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k) / (n - 1)
    if expected == 0:
        return None
    return 1 - observed / expected
