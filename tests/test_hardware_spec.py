"""Hardware outside the catalog (issue 17): ``gpu_from_spec`` and ``catalog_with``, hand-checked values and
every bad field refused with a ValueError that names it."""

import json

import pytest

from ringplan.hardware import SPEC_SOURCE, catalog_with, gpu_from_spec, gpu_link, load_catalog

SPEC = "memory=96GiB,bf16=989TF,hbm=3.35TB/s,link=450GB/s,gpus-per-node=8"


def test_spec_fields_in_bytes_and_seconds():
    """Each key lands in its field in base units (GiB binary, TB/GB decimal, TF = 1e12) with its source."""
    gpu = gpu_from_spec(SPEC)
    assert gpu.name == "custom" and gpu.driver_name == "custom"
    assert gpu.usable_memory_bytes == 96 * 2**30 and not gpu.usable_memory_measured
    assert gpu.peak_flops_per_s == {"bf16": 989e12}
    assert gpu.hbm_bandwidth_bytes_per_s == 3.35e12 and gpu.gpus_per_node == 8
    link = gpu_link(gpu, gpu.intra_node_link)
    assert link.bandwidth_bytes_per_s == 450e9 and link in gpu.own_links
    for field_name in ("usable_memory_bytes", "hbm_bandwidth_bytes_per_s", "intra_node_link", "gpus_per_node"):
        assert gpu.sources[field_name] == SPEC_SOURCE
    assert gpu.sources["peak_flops_per_s"].startswith(SPEC_SOURCE)
    assert gpu.inter_node_link == "infiniband-ndr-400" and "default" in gpu.sources["inter_node_link"]


def test_spec_name_units_and_inter_link():
    """name=, PF, plain FLOP/s numbers, inter-link= and underscores in keys are read."""
    gpu = gpu_from_spec("memory=128GB,fp16=1.2PF,fp32=47.9e12,hbm=3.2TB/s,link=400GB/s,inter-link=25GB/s,"
                        "gpus_per_node=4,name=MI250")
    assert gpu.name == "mi250" and gpu.usable_memory_bytes == 128 * 10**9
    assert gpu.peak_flops_per_s == {"fp16": 1.2e15, "fp32": 47.9e12}
    assert gpu_link(gpu, gpu.inter_node_link).bandwidth_bytes_per_s == 25e9


def test_spec_on_a_catalog_gpu_replaces_only_the_given_fields():
    """With a base, the unnamed fields (and their sources) are the base's; the name says what changed."""
    h100 = load_catalog().gpu("h100")
    gpu = gpu_from_spec("memory=96GiB", base=h100)
    assert gpu.name == "h100-80gb-sxm(memory=96GiB)" and gpu.usable_memory_bytes == 96 * 2**30
    assert gpu.physical_memory_bytes is None  # 96 GiB > the H100's 80 GiB datasheet capacity
    assert gpu.peak_flops_per_s == h100.peak_flops_per_s and gpu.intra_node_link == h100.intra_node_link
    assert gpu.sources["hbm_bandwidth_bytes_per_s"] == h100.sources["hbm_bandwidth_bytes_per_s"]


@pytest.mark.parametrize("text, named", [
    ("memory=lots," + SPEC.split(",", 1)[1], "memory=lots"),
    (SPEC.replace("989TF", "fast"), "bf16=fast"),
    (SPEC.replace("989TF", "-989TF"), "bf16=-989TF"),
    (SPEC.replace("3.35TB/s", "3.35 parsecs"), "hbm=3.35 parsecs"),
    (SPEC.replace("450GB/s", "0GB/s"), "link=0GB/s"),
    (SPEC.replace("gpus-per-node=8", "gpus-per-node=eight"), "gpus-per-node=eight"),
    (SPEC.replace("gpus-per-node=8", "gpus-per-node=0"), "gpus-per-node=0"),
    (SPEC + ",name=a b!", "name=a b!"),
    (SPEC + ",tf32=400TF", "unknown key 'tf32'"),
    (SPEC + ",memory=80GiB", "memory given twice"),
    (SPEC + ",oops", "'oops' is not key=value"),
    ("", "empty"),
    ("memory=96GiB", "lacks hbm, link, gpus-per-node, bf16"),
    (SPEC + ",name=h100", "catalog's h100-80gb-sxm"),
])
def test_bad_spec_names_the_field(text, named):
    """A malformed field, an unknown or repeated key, a missing field or a catalog name: ValueError naming it;
    an unknown key's message lists the accepted ones."""
    with pytest.raises(ValueError) as info:
        gpu_from_spec(text)
    assert named in str(info.value)
    if "unknown key" in named:
        assert "memory, bf16, fp16, fp32, hbm, link" in str(info.value)


def _write(tmp_path, data, name="my-gpus.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


USER_GPU = {"name": "gh200", "aliases": ["grace-hopper"], "driver_name": "NVIDIA GH200 480GB",
            "usable_memory_bytes": 96 * 2**30, "peak_flops_per_s": {"bf16": 989e12},
            "hbm_bandwidth_bytes_per_s": 4.0e12, "intra_node_link": "nvlink-c2c",
            "inter_node_link": "infiniband-ndr-400",
            "gpus_per_node": 4, "sources": {"hbm_bandwidth_bytes_per_s": "NVIDIA GH200 datasheet"}}
USER_LINK = {"name": "nvlink-c2c", "bandwidth_bytes_per_s": 450e9, "latency_s": 1e-6}


def test_catalog_merge_adds_and_replaces(tmp_path):
    """A user file adds a GPU (and the new link it names, which travels with it) and replaces a bundled
    one of the same name; the bundled rest is kept; every user number is sourced "user-specified (<file>)"."""
    h200 = dict(USER_GPU, name="h200", aliases=[], driver_name="NVIDIA H200", intra_node_link="nvlink-4",
                usable_memory_bytes=100 * 2**30, sources={})
    path = _write(tmp_path, {"schema": "ringplan.catalog/1", "links": [USER_LINK], "gpus": [USER_GPU, h200]})
    merged = catalog_with(path)
    gh200 = merged.gpu("grace-hopper")
    assert gh200.name == "gh200" and gh200.gpus_per_node == 4
    assert gh200.sources["usable_memory_bytes"] == f"user-specified ({path})"
    assert gh200.sources["hbm_bandwidth_bytes_per_s"] == f"user-specified ({path}): NVIDIA GH200 datasheet"
    assert gpu_link(gh200, gh200.intra_node_link).bandwidth_bytes_per_s == 450e9  # without the merged catalog
    assert merged.gpu("h200").usable_memory_bytes == 100 * 2**30
    assert merged.gpu("a100-40gb") == load_catalog().gpu("a100-40gb")
    assert len(merged.gpus) == len(load_catalog().gpus) + 1


@pytest.mark.parametrize("data, named", [
    ({"schema": "ringplan.catalog/2", "gpus": [USER_GPU]}, "schema"),
    ({"schema": "ringplan.catalog/1", "gpus": [dict(USER_GPU, usable_memory_bytes=-1)]}, "usable_memory_bytes"),
    ({"schema": "ringplan.catalog/1", "gpus": [USER_GPU]}, "unknown link 'nvlink-c2c'"),
    ({"schema": "ringplan.catalog/1", "gpus": [dict(USER_GPU, hbm="4TB/s")], "links": [USER_LINK]}, "hbm"),
    ({"schema": "ringplan.catalog/1", "gpus": [dict(USER_GPU, aliases=["h100"])], "links": [USER_LINK]}, "'h100'"),
    ({"schema": "ringplan.catalog/1", "gpu": []}, "gpu"),
])
def test_bad_catalog_file_names_file_and_field(tmp_path, data, named):
    """A user catalog that fails validation: ValueError naming the file and the field or entry."""
    path = _write(tmp_path, data)
    with pytest.raises(ValueError) as info:
        catalog_with(path)
    assert path in str(info.value) and named in str(info.value)
