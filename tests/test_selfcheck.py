"""`tapa selfcheck --cpu` runs in CI so that it cannot rot; its extension check fails on a lost load; its
Transformer Engine check's weight transfer runs here local spec -> local spec and fails on lost norms."""

import json
import subprocess
import sys

from tests.distributed import run_ranks


def test_selfcheck_cpu_writes_a_passing_report(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "tapa_megatron.cli", "selfcheck", "--cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert checks["kernels"]["status"] == "pass" and len(checks["kernels"]["cases"]) == 9
    assert checks["engines"]["status"] == "skipped" and "CUDA" in checks["engines"]["reason"]
    assert checks["extension"]["status"] == "pass" and checks["extension"]["source_relative_improvement"] > 0.1
    transformer_engine = checks["transformer_engine"]
    assert transformer_engine["status"] == "skipped" and "Transformer Engine" in transformer_engine["reason"]
    bench = checks["bench"]
    assert bench["status"] == "pass" and {row["impl"] for row in bench["rows"]} == {"torch", "sdpa"}
    assert all(row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 for row in bench["rows"])
    (ratio,) = bench["tapa_over_sdpa_fwd_bwd_time"].values()
    torch_row, sdpa_row = sorted(bench["rows"], key=lambda row: row["impl"] != "torch")
    assert ratio == torch_row["fwd_bwd_ms"] / sdpa_row["fwd_bwd_ms"]
    assert report["versions"]["megatron_core"].startswith("0.")


def _extension_without_load(rank, world_size):
    import torch
    from megatron.core import parallel_state

    from tapa_megatron import selfcheck
    from tapa_megatron.train import checkpoint

    parallel_state.initialize_model_parallel()
    try:
        checkpoint.load_checkpoint = lambda *args, **kwargs: None  # the weights never arrive
        return selfcheck.check_extension(torch.device("cpu"))
    finally:
        parallel_state.destroy_model_parallel()


def test_extension_check_fails_when_the_weights_are_lost():
    outcome = run_ranks(1, _extension_without_load)[0]
    assert outcome["status"] == "fail" and outcome["max_relative_difference"] > 0.1



def _spec_transfer(rank, world_size, fault):
    """check_transformer_engine's transfer, local spec -> local spec (what a CPU has), with an optional fault
    in what Megatron's dist_checkpointing loads: "reset_norms" (the norms arrive at their initial 1, as
    when a transfer misses the norms the spec's key map renames) or "drop_norms" (they do not arrive).
    Also the checkpoint keys of the local model's norms, which a TE model loads by."""
    import torch
    from megatron.core import dist_checkpointing, parallel_state

    from tapa_megatron import selfcheck
    from tapa_megatron.model import build_gpt_model
    from tapa_megatron.train.trainer import run_transformer_config

    parallel_state.initialize_model_parallel()
    try:
        real_load = dist_checkpointing.load

        def faulty_load(sharded_state_dict, directory, **kwargs):
            loaded = real_load(sharded_state_dict, directory, **kwargs)
            for key in [key for key in loaded if "layernorm" in key]:
                if fault == "reset_norms":
                    loaded[key] = torch.ones_like(loaded[key])
                else:
                    del loaded[key]
            return loaded

        if fault:
            dist_checkpointing.load = faulty_load
        cfg = selfcheck._run_config()
        local = build_gpt_model(cfg.model, run_transformer_config(cfg, torch.float32), vocab_size=selfcheck.VOCAB,
                                max_sequence_length=selfcheck.SEQ, use_transformer_engine=False)
        norm_keys = {value.key for name, value in local.sharded_state_dict().items() if "layernorm" in name}
        try:
            return norm_keys, selfcheck.check_transformer_engine(torch.device("cpu"), use_transformer_engine=False)
        except ValueError as err:
            return norm_keys, str(err)
    finally:
        parallel_state.destroy_model_parallel()


def test_spec_transfer_round_trips_local_weights_and_names_the_norms_as_transformer_engine_does():
    norm_keys, outcome = run_ranks(1, _spec_transfer, None)[0]
    # Megatron's local spec saves its norms under the names of TE's fused layer-norm linears (the layers
    # stacked along a leading axis).
    assert norm_keys == {"decoder.final_layernorm.weight",
                         "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                         "decoder.layers.mlp.linear_fc1.layer_norm_weight"}
    assert outcome["status"] == "pass"
    assert [(case["position"], case["dtype"]) for case in outcome["cases"]] == [("tapa", "float32"),
                                                                                ("rope", "float32")]
    for case in outcome["cases"]:  # same code, same weights: the same logits, bit for bit
        assert case["relative_difference_after"] == 0.0 and case["relative_difference_before"] > 0.1


def test_spec_transfer_check_fails_when_the_norms_are_lost():
    _, outcome = run_ranks(1, _spec_transfer, "reset_norms")[0]
    assert outcome["status"] == "fail"
    assert all(case["relative_difference_after"] > 100 * case["tolerance"] for case in outcome["cases"])
    _, error = run_ranks(1, _spec_transfer, "drop_norms")[0]
    assert error.startswith("the transfer left weights out: missing ['decoder.layers.0.input_layernorm.weight'")
