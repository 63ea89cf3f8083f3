"""Provenance labels (``ringplan.time.provenance``): ranking, keeping the weakest, the headline."""

from ringplan.time.provenance import MINOR_COMPONENTS, note_weakest, overall_provenance, provenance_rank


def test_provenance_rank_of_a_bare_extrapolated_label():
    """"extrapolated …" without a parenthesised source ranks as extrapolated (it once recursed forever)."""
    assert provenance_rank("extrapolated outside measured range") == provenance_rank("extrapolated (x: measured)") == 1
    assert provenance_rank("extrapolated (n beyond: transferred from h100)") == 2


def test_ranks_order_the_sources():
    """measured and override < extrapolated < transferred < default."""
    labels = ["measured on this GPU", "override: user", "extrapolated outside measured range (measured on this GPU)",
              "fitted on h100 and transferred", "default: catalog nvlink"]
    assert [provenance_rank(label) for label in labels] == [0, 0, 1, 2, 3]


def test_note_keeps_the_weakest_label():
    """A stronger label never replaces a weaker one; an equally weak one replaces it (the latest wins)."""
    notes: dict[str, str] = {}
    note_weakest(notes, "merge", "default: a")
    note_weakest(notes, "merge", "measured on this GPU")
    assert notes == {"merge": "default: a"}
    note_weakest(notes, "merge", "default: b")
    assert notes == {"merge": "default: b"}


def test_overall_provenance_headline():
    """The headline names the weakest carrying component; minor components do not set it."""
    assert overall_provenance({}) == "measured on this GPU"
    assert overall_provenance({"kernel": "measured on this GPU", MINOR_COMPONENTS[0]: "default: 90%"}) == \
        "measured on this GPU"
    assert overall_provenance({"kernel": "extrapolated outside measured range (measured on this GPU)"}) == \
        "extrapolated outside measured range"
    assert overall_provenance({"kernel": "extrapolated (x: fitted on h100 and transferred)"}) == \
        "fitted on h100 and transferred"
    assert overall_provenance({"link": "default: catalog ib"}) == "default (unmeasured): ANCHORS.md / catalog"
