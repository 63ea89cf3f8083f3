"""An emulated GPU caps memory, not speed: ``validate --emulate-gpu`` predicts the step time of the
GPU that ran (issue 20: an emulated GTX 1080 on an H100 got no prediction, "no peak FLOP/s for bf16")."""

from ringplan.hardware import load_catalog
from ringplan.workload import AttentionShape, RingLayout, Workload
from ringplan_runtime.validate import Plan, predicted_step_time_s

CATALOG = load_catalog()
WORKLOAD = Workload(seq_len_tokens=262_144, shape=AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128))


def test_emulated_plan_is_timed_on_the_gpu_that_ran():
    """The emulated GTX 1080's plan gets the H100's step time, and says so."""
    h100, gtx = CATALOG.gpu("h100"), CATALOG.gpu("gtx-1080")
    plan = Plan(workload=WORKLOAD, layout=RingLayout(ring_size=1), gpu=gtx, emulate=gtx, runs_on=h100)
    emulated_s, source = predicted_step_time_s(plan)
    direct_s, _ = predicted_step_time_s(Plan(workload=WORKLOAD, layout=RingLayout(ring_size=1), gpu=h100))
    assert emulated_s == direct_s and emulated_s > 0
    assert "timed as h100-80gb-sxm" in source


def test_emulation_on_an_unknown_gpu_keeps_the_old_answer():
    """Without the running GPU in the catalog the plan's own GPU is used (bf16 on a GTX 1080: no rate)."""
    gtx = CATALOG.gpu("gtx-1080")
    plan = Plan(workload=WORKLOAD, layout=RingLayout(ring_size=1), gpu=gtx, emulate=gtx, runs_on=None)
    seconds, source = predicted_step_time_s(plan)
    assert seconds is None and "bf16" in source


def test_whole_model_plan_is_timed_on_its_gpu():
    """A whole-model plan (no emulation) gets the stack time model's step time on its GPU."""
    from ringplan.models import load_model_catalog
    from ringplan.stack import StackWorkload
    from ringplan_runtime.validate import StackPlan, predicted_stack_step_time_s

    w = StackWorkload(model=load_model_catalog().model("qwen3-0.6b"), seq_len_tokens=8192, world_size=1,
                      layout=RingLayout(ring_size=1))
    seconds, source = predicted_stack_step_time_s(StackPlan(workload=w, gpu=CATALOG.gpu("h100")))
    assert seconds > 0 and "stack time model" in source
