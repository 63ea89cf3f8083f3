"""Provenance labels of a time prediction: how well founded each component's number is.

Every costed component (a kernel, a link, the merge, the GEMMs, …) carries a label that starts
with its source: ``measured on this GPU``, ``extrapolated outside measured range (…)``,
``fitted on <GPU> and transferred``, ``default: …`` (ANCHORS.md or the catalog), ``override: …``.
A prediction keeps the weakest label per component and names the weakest overall.

Pure Python (no numpy), so the whole-model step time can rank labels without loading the
attention time model.
"""

from __future__ import annotations

import re

#: Strength of a label's source, 0 strongest; ``provenance_rank`` maps a label to one of these.
PROVENANCE_RANKS: dict[str, int] = {"measured": 0, "extrapolated": 1, "transferred": 2, "default": 3}
#: Components too small to set a prediction's headline provenance (still listed in the details):
#: the accumulator copies/casts/adds are a few % of a step.
MINOR_COMPONENTS = ("copies / casts / adds",)


def provenance_rank(label: str) -> int:
    """0 measured/override, 1 extrapolated, 2 transferred, 3 default (higher = weaker)."""
    if label.startswith("default"):
        return PROVENANCE_RANKS["default"]
    if label.startswith("extrapolated"):  # "extrapolated (…: source)" ranks by its source too
        inner = label[label.find("(") + 1:] if "(" in label else ""
        return max(PROVENANCE_RANKS["extrapolated"], provenance_rank(inner) if inner else PROVENANCE_RANKS["extrapolated"])
    return PROVENANCE_RANKS["transferred"] if "transferred" in label else PROVENANCE_RANKS["measured"]


def note_weakest(notes: dict[str, str], component: str, label: str) -> None:
    """Record ``label`` for ``component`` in ``notes`` unless a weaker label is already there (ties: the latest)."""
    if provenance_rank(label) >= provenance_rank(notes.get(component, "measured")):
        notes[component] = label


def overall_provenance(notes: dict[str, str]) -> str:
    """The weakest source among the components that carry a step (kernels, links, merge, GEMMs),
    as a headline: ``MINOR_COMPONENTS`` are left out."""
    worst = max((v for k, v in notes.items() if k not in MINOR_COMPONENTS), key=provenance_rank, default="measured")
    rank = provenance_rank(worst)
    if rank == PROVENANCE_RANKS["default"]:
        return "default (unmeasured): ANCHORS.md / catalog"
    if rank == PROVENANCE_RANKS["transferred"]:
        found = re.search(r"fitted on .*? and transferred", worst)  # a label may carry a "(±N%)" after it
        return found.group(0) if found else "measured on this GPU at another shape (transferred)"
    if rank == PROVENANCE_RANKS["extrapolated"]:
        return "extrapolated outside measured range"
    return "measured on this GPU"
