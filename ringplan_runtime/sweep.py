"""Profile sweeps: tokens × world sizes × shapes × modes, measured and merged into a profile file.

``sweep_points`` builds the grid, ``run_sweep`` measures it ring size by ring size with
``ringplan_runtime.points.run_points`` (failures cost one point, never the sweep) under a tqdm
progress bar, and merges every finished point into the profile through
``ringplan.profiles.attention.write_profile`` (atomic, merged by key: rows already on disk are never
dropped). Out-of-memory points are written as ``oom`` rows; points lost to a dead rank or a
timeout measured nothing and are only reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ringplan.profiles.attention import Measurement as ProfileRow
from ringplan.profiles.attention import Profile, write_profile
from ringplan.profiles.envelope import Provenance as ProfileProvenance
from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload
from ringplan_runtime.harness import progress_bar
from ringplan_runtime.measure import MeasureSettings
from ringplan_runtime.points import PointResult, SweepPoint, run_points
from ringplan_runtime.provenance import Provenance


def sweep_points(*, tokens: Sequence[int], world_sizes: Sequence[int], shapes: Sequence[AttentionShape],
                 modes: Sequence[str] = ("forward",), pattern: AttentionPattern | None = None,
                 layout: str = "contiguous", backend: str = "auto", projections: bool = False) -> list[SweepPoint]:
    """The grid tokens × world sizes × shapes × modes (``forward`` | ``training``), valid points only.

    A token count that does not split over a world size (e.g. odd tokens on a zigzag ring) is
    skipped for that world size, not an error; a grid with no valid point at all is.
    """
    unknown = sorted(set(modes) - {"forward", "training"})
    if unknown:
        raise ValueError(f"modes {unknown} are not 'forward' or 'training'")
    points, skipped = [], []
    for world_size in world_sizes:
        ring = RingLayout(ring_size=world_size, layout=layout, backend=backend)
        for shape in shapes:
            for mode in modes:
                for seq_len in tokens:
                    try:
                        workload = Workload(seq_len_tokens=seq_len, shape=shape, pattern=pattern or AttentionPattern(),
                                            training=mode == "training", projections=projections)
                        points.append(SweepPoint(workload=workload, layout=ring))
                    except ValueError as error:
                        skipped.append(str(error))
    if not points:
        raise ValueError(f"no valid point in the sweep: {skipped[0] if skipped else 'empty grid'}")
    return points


def run_sweep(points: Sequence[SweepPoint], *, profile_path: str | Path, settings: MeasureSettings | None = None,
              command: str | None = None, timeout_s: float = 600.0, progress: bool = True,
              record_as: str | None = None, series: str | None = None, device: str = "auto",
              deadline_s: float | None = None) -> list[PointResult]:
    """Measure ``points`` (grouped by ring size) and merge each finished point into ``profile_path``.

    Rows are written as they arrive, so an interrupted sweep keeps what it measured; rows already
    in the file are merged by key (``ringplan.profiles.attention.write_profile``), never dropped.
    ``deadline_s`` (``time.monotonic()``): points not finished by then get no result (``run_points``).
    """
    settings = settings or MeasureSettings()
    results: list[PointResult] = []
    bar = progress_bar(len(points), enabled=progress, desc="profile")

    def record(result: PointResult) -> None:
        write_results(profile_path, [result], record_as=record_as, series=series)
        bar.set_postfix_str(_short(result))
        bar.update(1)

    for ring_size in sorted({p.layout.ring_size for p in points}):
        group = [p for p in points if p.layout.ring_size == ring_size]
        results.extend(run_points(group, settings=settings, timeout_s=timeout_s, on_result=record, command=command,
                                  device=device, deadline_s=deadline_s))
    bar.close()
    return results


def _short(result: PointResult) -> str:
    w = result.point.workload
    state = "ok" if result.feasible else (result.failure or "failed").split(":")[0]
    return f"P={result.point.layout.ring_size} S={w.seq_len_tokens:,} {state}"


def catalog_gpu_name(driver_name: str, record_as: str | None = None) -> str:
    """Catalog name for the profile rows: ``record_as`` if given, else the catalog entry whose
    ``driver_name`` is what the driver reports; an unknown GPU is an error (rows need a catalog name)."""
    from ringplan.hardware import load_catalog

    catalog = load_catalog()
    if record_as is not None:
        return catalog.gpu(record_as).name
    spec = catalog.gpu_by_driver_name(driver_name)
    if spec is None:
        raise ValueError(f"the local device {driver_name!r} is not in the GPU catalog (profiles/gpus.json): "
                         f"add it, or pass --record-as NAME")
    return spec.name


def profile_row(result: PointResult, *, gpu: str, series: str | None = None) -> ProfileRow:
    """One profile row (``ringplan.profiles.attention.Measurement``) from a point's result; OOM → ``oom=True``."""
    w, ring = result.point.workload, result.point.layout
    notes = []
    if result.non_allocator_bytes is not None:
        notes.append(f"non_allocator_bytes={result.non_allocator_bytes}")
    if result.allocator_cap_bytes is not None:
        notes.append(f"allocator_cap_bytes={result.allocator_cap_bytes}")
    return ProfileRow(
        gpu=gpu, seq_len_tokens=w.seq_len_tokens, ring_size=ring.ring_size, n_heads=w.shape.n_heads,
        n_kv_heads=w.shape.n_kv_heads, head_dim=w.shape.head_dim, embed_dim=w.shape.embed_dim, dtype=w.shape.dtype,
        layout=ring.layout, backend=result.backend or ring.backend, batch=w.shape.batch, causal=w.pattern.causal,
        segment_lengths_tokens=w.pattern.segment_lengths_tokens, dilation_rates=w.pattern.dilation_rates,
        training=w.training, projections=w.projections, peak_allocated_bytes=result.peak_allocated_bytes,
        peak_reserved_bytes=result.peak_reserved_bytes, device_used_bytes=result.device_used_bytes,
        tracked_peak_bytes=result.tracked_peak_bytes, step_time_s=result.step_time_s,
        bytes_sent_per_rank=result.sent_bytes, oom=not result.feasible, kind="measured", series=series,
        notes="; ".join(notes) or None)


def profile_provenance(provenance: Provenance, *, interconnect: str | None = None) -> ProfileProvenance:
    """The runtime's ``Provenance`` in the profile file's provenance keys."""
    return ProfileProvenance(
        gpu_driver_name=provenance.gpu_name, driver_version=provenance.driver_version,
        torch_version=provenance.torch_version, nccl_version=provenance.nccl_version,
        cuda_version=provenance.cuda_version, git_sha=provenance.git_sha, date=provenance.date_utc,
        command=provenance.command, method=provenance.method, hostname=provenance.hostname,
        interconnect=interconnect, source="ringplan profile (ringplan_runtime.sweep)")


def write_results(profile_path: str | Path, results: Sequence[PointResult], *, record_as: str | None = None,
                  series: str | None = None, interconnect: str | None = None) -> int:
    """Merge the feasible and out-of-memory results into the profile file; returns rows written.

    Points that failed for another reason (lost rank, timeout) measured nothing and are not
    written: the caller reports them. Rows already in the file are kept (``write_profile`` merges).
    The file's provenance is the one rank 0 of the measuring ring recorded.
    """
    kept = [r for r in results if r.feasible or r.failure == "oom"]
    provenance = next((r.provenance for r in kept if r.provenance is not None), None)
    if not kept or provenance is None:
        return 0
    gpu = catalog_gpu_name(provenance.gpu_name, record_as)
    rows = tuple(profile_row(r, gpu=gpu, series=series) for r in kept)
    write_profile(profile_path, Profile(provenance=profile_provenance(provenance, interconnect=interconnect),
                                        rows=rows))
    return len(rows)
