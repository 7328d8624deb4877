"""RunSpec validation, the DeepSpeed config it renders, the matrix it spans, and known deviations."""
import itertools
import json

import pytest

from numerics.cell import matrix
from numerics.cell.spec import SCALED_ZERO_KEYS, RunSpec, SpecError, load_template
from numerics.judge import deviations


@pytest.mark.parametrize("fields, message", [
    ({"dtype": "fp8"}, "dtype='fp8' is not one of"),
    ({"zero_stage": 4}, "zero_stage=4 is not one of"),
    ({"comm_dtype": "int8"}, "comm_dtype='int8' is not one of"),
    ({"world_size": 0}, "world_size=0 must be a positive integer"),
    ({"fault": "cosmic_ray"}, "unknown fault 'cosmic_ray'"),
    ({"fault": "grad_scale@big"}, "'big' is not a number"),
    ({"fault": "grad_scale@-0.1"}, "must be positive"),
    ({"fault": "drop_bucket@0.1"}, "'drop_bucket' takes no parameter"),
    ({"invariants": ("finite", "vibes")}, r"unknown invariant\(s\) \['vibes'\]"),
    ({"ds_extra": "{not json"}, "ds_extra is not valid JSON"),
    ({"ds_extra": '{"fp16": {"enabled": true}}'}, "ds_extra sets 'fp16'"),
])
def test_runspec_rejects_bad_input_with_a_clear_message(fields, message):
    with pytest.raises(SpecError, match=message):
        RunSpec(**fields)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_takes_zero_keys_from_the_template(stage):
    config = RunSpec(zero_stage=stage).ds_config()
    assert config["zero_optimization"] == load_template(f"zero{stage}")["zero_optimization"]
    default = RunSpec(zero_stage=stage, buckets="default").ds_config()["zero_optimization"]
    assert default["stage"] == stage and not set(default) & set(SCALED_ZERO_KEYS)
    assert set(config["zero_optimization"]) - set(default) <= set(SCALED_ZERO_KEYS)


@pytest.mark.parametrize("dtype, present, absent", [
    ("fp32", (), ("fp16", "bf16")), ("bf16", ("bf16",), ("fp16",)), ("fp16", ("fp16",), ("bf16",)),
])
def test_ds_config_precision_blocks(dtype, present, absent):
    config = RunSpec(dtype=dtype).ds_config()
    assert all(config[key]["enabled"] for key in present)
    assert not set(absent) & set(config)
    assert "communication_data_type" not in config
    assert RunSpec(dtype=dtype, comm_dtype="fp16").ds_config()["communication_data_type"] == "fp16"


def test_ds_config_batch_and_optimizer():
    spec = RunSpec(micro_batch=2, grad_accum=3, world_size=4, optimizer="sgd", lr=0.05)
    config = spec.ds_config()
    assert config["train_batch_size"] == 2 * 3 * 4 == spec.global_batch
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (2, 3)
    assert config["optimizer"] == {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}}
    assert "optimizer" not in spec.with_(optimizer_source="client").ds_config()
    assert RunSpec(ds_extra=json.dumps({"gradient_clipping": 1.0})).ds_config()["gradient_clipping"] == 1.0


@pytest.mark.parametrize("fields, cell_id", [
    ({"zero_stage": 2, "dtype": "bf16", "comm_dtype": "fp32"}, "zero2-bf16-comm_fp32-ws2"),
    ({"zero_stage": 3, "dtype": "fp16", "world_size": 4, "grad_accum": 4}, "zero3-fp16-ws4-ga4"),
    ({"optimizer": "sgd", "optimizer_source": "client", "buckets": "default"}, "zero0-fp32-ws2-client_sgd-buckets_default"),
    ({"ds_extra": json.dumps({"gradient_clipping": 0.3})}, "zero0-fp32-ws2-clip0.3"),  # a cell that clips is another cell
    ({"ds_extra": json.dumps({"gradient_clipping": 0.0})}, "zero0-fp32-ws2"),
])
def test_cell_ids_are_readable(fields, cell_id):
    assert RunSpec(**fields).cell_id == cell_id


def pairs(cell, names):
    return {((a, cell[a]), (b, cell[b])) for a, b in itertools.combinations(names, 2)}


def triples(cell, family):
    kept = tuple(cell[k] for k in family.kept)
    return {(kept, a, cell[a]) for a in family.axes if a not in family.kept}


@pytest.mark.parametrize("cover", ["pairs", "triples"])
@pytest.mark.parametrize("family", matrix.FAMILIES, ids=lambda f: f.name)
def test_covering_subset_keeps_stage_dtype_and_covers_all_pairs(family, cover):
    chosen, full = matrix.family_cells(family, cover), matrix.full_product(family)
    kept = {tuple(c[k] for k in family.kept) for c in chosen}
    assert kept == set(itertools.product(*(family.axes[k] for k in family.kept)))
    names = list(family.axes)
    assert set().union(*(pairs(c, names) for c in chosen)) == set().union(*(pairs(c, names) for c in full))
    if cover == "triples":  # every value of every other axis beside every stage x dtype it can run with
        assert set().union(*(triples(c, family) for c in chosen)) == set().union(*(triples(c, family) for c in full))
    assert len(chosen) <= len(full)
    assert len({RunSpec(**matrix.fixed_batch({**family.base, **c})).global_batch for c in chosen}) == 1


def test_triples_hold_what_pairs_miss():
    """The comm family: pairs put fp32 communication beside ZeRO-2 and beside bf16, but never in
    one cell, though that is the DeepSpeed incident (communication_data_type fp32 under bf16, loss
    0 within ten steps); triples do."""
    comm = next(f for f in matrix.FAMILIES if f.name == "comm")
    wanted = {"zero_stage": 2, "dtype": "bf16", "comm_dtype": "fp32"}
    assert not any(c.items() >= wanted.items() for c in matrix.family_cells(comm, "pairs"))
    assert any(c.items() >= wanted.items() for c in matrix.family_cells(comm, "triples"))
    with pytest.raises(ValueError, match="unknown cover"):
        matrix.family_cells(comm, "quads")


def test_default_matrix_is_a_deduplicated_subset_of_the_full_one():
    default, full = matrix.cells(), matrix.cells("full")
    assert len({s.cell_id for s in default}) == len(default)
    assert {s.cell_id for s in default} <= {s.cell_id for s in full}


ZERO0_FP16 = {"zero_stage": 0, "dtype": "fp16", "fault": None, "optimizer_source": "config"}


@pytest.mark.parametrize("spec, invariant, deepspeed, found", [
    (ZERO0_FP16, "parity_loss", "0.19.8", True),
    (ZERO0_FP16, "parity_loss", "0.19.0+cpu", True),  # local build tags are ignored
    (ZERO0_FP16, "parity_loss", "0.20.0", False),  # outside the version range
    (ZERO0_FP16, "parity_loss", None, False),  # package not installed
    (ZERO0_FP16, "finite", "0.19.8", False),  # other invariant
    ({**ZERO0_FP16, "zero_stage": 1}, "parity_loss", "0.19.8", False),
    ({**ZERO0_FP16, "fault": "drop_bucket"}, "parity_loss", "0.19.8", False),
])
def test_deviations_match_on_spec_fields_and_versions(spec, invariant, deepspeed, found):
    assert (deviations.find(spec, invariant, {"deepspeed": deepspeed}) is not None) is found
