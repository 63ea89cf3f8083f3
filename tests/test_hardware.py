"""GPU catalog: required entries, a source for every number, measured memory, lookup and errors."""

import json

import pytest

from ringplan.hardware import load_catalog

REQUIRED_GPUS = ("gtx-1080", "v100-16gb", "v100-32gb", "a10-24gb", "l4", "l40s", "rtx-4090", "a100-40gb",
                 "a100-80gb", "h100-80gb-sxm", "h100-80gb-pcie", "h200", "b200", "mi300x")
REQUIRED_LINKS = ("nvlink-1", "nvlink-2", "nvlink-3", "nvlink-4", "nvlink-5", "pcie-gen3-x16", "pcie-gen4-x16",
                  "pcie-gen5-x16", "infiniband-hdr-200", "infiniband-ndr-400", "ethernet-100g", "ethernet-400g")
SOURCED_GPU_FIELDS = ("usable_memory_bytes", "physical_memory_bytes", "peak_flops_per_s", "hbm_bandwidth_bytes_per_s", "intra_node_link",
                      "inter_node_link", "gpus_per_node", "runtime_overhead_bytes")
MIB = 2**20


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def test_required_gpus_and_links_present(catalog):
    """Every GPU and link the issue names is in the catalog."""
    assert {g.name for g in catalog.gpus} >= set(REQUIRED_GPUS)
    assert {link.name for link in catalog.links} >= set(REQUIRED_LINKS)


def test_every_number_has_a_source(catalog):
    """Each GPU field and each link number carries a non-empty source."""
    for gpu in catalog.gpus:
        missing = [f for f in SOURCED_GPU_FIELDS if not gpu.sources.get(f, "").strip()]
        assert not missing, f"{gpu.name}: no source for {missing}"
    for link in catalog.links:
        assert link.sources.get("bandwidth_bytes_per_s") and link.sources.get("latency_s"), link.name


def test_measured_memory_is_what_the_driver_reported(catalog):
    """H100 SXM and H200 usable memory are the nvidia-smi totals measured on the lent machines."""
    assert catalog.gpu("h100-80gb-sxm").usable_memory_bytes == 81_559 * MIB
    assert catalog.gpu("h200").usable_memory_bytes == 143_771 * MIB
    assert catalog.gpu("h100").usable_memory_measured


@pytest.mark.parametrize("name, total_mib", [
    ("a10-24gb", 23_028), ("l4", 23_034), ("l40s", 46_068), ("rtx-4090", 24_564), ("h100-80gb-pcie", 81_559),
    ("b200", 183_359), ("a100-40gb", 40_960), ("a100-80gb", 81_920), ("mi300x", 196_288),
])
def test_usable_memory_is_the_driver_total_not_the_datasheet(catalog, name, total_mib):
    """Issue 17: usable memory is the total the driver reports (nvidia-smi / rocm-smi, cited), not the
    datasheet's GB read as GiB; GDDR6 cards with ECC on report 15/16 of their chips, less a little."""
    gpu = catalog.gpu(name)
    assert gpu.usable_memory_bytes == total_mib * MIB
    assert gpu.usable_memory_measured
    assert "driver-reported" in gpu.sources["usable_memory_bytes"]


def test_usable_memory_never_exceeds_physical(catalog):
    """Every entry names its physical (datasheet) capacity, and what the driver reports fits in it;
    with the 5% margin the L40S budget is 42.7 GiB, no longer 45.6 GiB of the 45.0 GiB that exist."""
    for gpu in catalog.gpus:
        assert gpu.physical_memory_bytes is not None, gpu.name
        assert gpu.usable_memory_bytes <= gpu.physical_memory_bytes, gpu.name
    l40s = catalog.gpu("l40s")
    assert l40s.usable_memory_bytes * 0.95 < 46_068 * MIB < l40s.physical_memory_bytes


def test_links_are_what_one_ring_neighbour_gets(catalog):
    """Issue 17: a V100 ring neighbour on a DGX-1 (hybrid cube mesh) gets one NVLink 2 link, 25 GB/s,
    not the six-link 150 GB/s sum; NVSwitch systems give one peer all links (A100 300, H100 450,
    B200 900 GB/s one way); an MI300X peer gets its one 64 GB/s Infinity Fabric link."""
    expected = {"nvlink-1": 20e9, "nvlink-2": 25e9, "nvlink-3": 300e9, "nvlink-4": 450e9, "nvlink-5": 900e9,
                "xgmi-mi300x": 64e9}
    for name, bandwidth in expected.items():
        assert catalog.link(name).bandwidth_bytes_per_s == pytest.approx(bandwidth), name
    assert catalog.gpu("v100-32gb").intra_node_link == "nvlink-2"


def test_flops_are_dense_and_links_resolve(catalog):
    """H100 SXM bf16 is the dense 989.5 TFLOP/s (half the datasheet's sparse figure); every GPU's
    links exist; NVLink 4 is 450 GB/s one way."""
    assert catalog.gpu("h100").peak_flops_per_s["bf16"] == pytest.approx(989.5e12)
    assert catalog.link("nvlink-4").bandwidth_bytes_per_s == pytest.approx(450e9)
    for gpu in catalog.gpus:
        assert catalog.link(gpu.intra_node_link).bandwidth_bytes_per_s > 0
        assert catalog.link(gpu.inter_node_link).bandwidth_bytes_per_s > 0


@pytest.mark.parametrize("name, canonical", [
    ("H100", "h100-80gb-sxm"), ("h100-SXM", "h100-80gb-sxm"), ("H100_PCIe", "h100-80gb-pcie"),
    (" a100-40GB ", "a100-40gb"), ("NVIDIA H100 80GB HBM3", "h100-80gb-sxm"), ("4090", "rtx-4090"),
])
def test_lookup_is_case_insensitive_with_aliases(catalog, name, canonical):
    """Names, aliases and driver names resolve in any case and with _ or spaces for -."""
    assert catalog.gpu(name).name == canonical


def test_ambiguous_alias_lists_the_choices(catalog):
    """'a100' could be either memory size: the error lists both."""
    with pytest.raises(ValueError, match="a100-40gb, a100-80gb"):
        catalog.gpu("a100")


def test_unknown_gpu_suggests_closest_names(catalog):
    """An unknown name raises ValueError quoting it and listing close names."""
    with pytest.raises(ValueError) as info:
        catalog.gpu("h10")
    assert "'h10'" in str(info.value) and "h100" in str(info.value)


def test_driver_name_lookup(catalog):
    """Profiles name GPUs as the driver does; the catalog maps them back (or None)."""
    assert catalog.gpu_by_driver_name("NVIDIA GeForce GTX 1080").name == "gtx-1080"
    assert catalog.gpu_by_driver_name("Unknown Card") is None


def _write(tmp_path, data) -> str:
    path = tmp_path / "gpus.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_bad_catalog_files_name_the_file(tmp_path):
    """Missing file, bad JSON, wrong schema, unknown link, non-finite numbers and usable memory above
    the physical capacity are ValueErrors that name the file."""
    with open(load_catalog().source_path) as handle:
        good = json.load(handle)
    cases = {"missing": None, "bad json": "{not json", "schema": {**good, "schema": "other"}}
    broken_link = json.loads(json.dumps(good))
    broken_link["gpus"][0]["intra_node_link"] = "nvlink-9"
    cases["unknown link"] = broken_link
    not_finite = json.loads(json.dumps(good))
    not_finite["gpus"][0]["hbm_bandwidth_bytes_per_s"] = float("nan")
    cases["nan"] = not_finite
    over_physical = json.loads(json.dumps(good))
    over_physical["gpus"][0]["usable_memory_bytes"] = over_physical["gpus"][0]["physical_memory_bytes"] + 1
    cases["usable above physical"] = over_physical
    for label, data in cases.items():
        path = str(tmp_path / "absent.json") if data is None else _write(tmp_path, data)
        load_catalog.cache_clear()
        with pytest.raises(ValueError) as info:
            load_catalog(path)
        assert path in str(info.value), label
    load_catalog.cache_clear()
