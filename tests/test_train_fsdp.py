"""FSDP training (``parallel: fsdp``): the setting, sharded checkpoints, exact resumption, export, and 2 gloo
processes against 1 (the data and the run settings are those of test_train.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harmon.checkpoint import load_model, load_state_dict
from harmon.config import HarmonConfig
from harmon.errors import InputError
from harmon.saving import save_model
from harmon.train.config import TrainConfig
from harmon.train.trainer import edit_checkpoint, export_checkpoint, train
from test_train import TINY_FIXTURE, config, dataset  # noqa: F401 (dataset: the fixture, used by name)

# a run stopped after some steps, as if killed (torchrun runs a script, not a function)
STOPPING_RUN = ("import json, sys\nfrom harmon.train.config import TrainConfig\nfrom harmon.train.trainer import train\n"
                "train(TrainConfig.from_dict(json.load(open(sys.argv[1]))), stop_after=int(sys.argv[2]))\n")


def losses(history: list[dict]) -> list[tuple[float, float]]:
    """(t2i, i2t) of each step of a run's records."""
    return [(h["t2i"], h["i2t"]) for h in history]


def same_weights(a: Path, b: Path) -> bool:
    """Whether two model folders hold equal tensors under the same names."""
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_parallel_setting_is_checked_where_it_enters(dataset, tmp_path):
    assert config(dataset, tmp_path).parallel == "ddp"
    path = tmp_path / "train.yaml"
    path.write_text(f"model: {TINY_FIXTURE}\noutput_dir: {tmp_path / 'out'}\nparallel: fsdp\n"
                    f"data:\n  jsonl: [{dataset / 't2i.jsonl'}]\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.parallel == "fsdp"
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # as resuming and exporting read it
    with pytest.raises(InputError, match=r"^parallel must be one of 'ddp', 'fsdp', got 'FSDP' \(str\)$"):
        config(dataset, tmp_path, parallel="FSDP")
    with pytest.raises(InputError, match=r"^parallel must be one of 'ddp', 'fsdp', got True \(bool\)$"):
        config(dataset, tmp_path, parallel=True)


def test_sharded_checkpoints_resume_exactly_export_and_edit(dataset, tmp_path):
    """One process with ``parallel: fsdp`` writes DCP checkpoints: resumed exactly, exported and edited as the
    others (that it computes what two processes do is the next test's)."""
    full = train(config(dataset, tmp_path / "full", parallel="fsdp"))
    checkpoint = tmp_path / "full" / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["meta.json", "rng_rank0.pt", "shards"]
    assert json.loads((checkpoint / "meta.json").read_text()) == {"step": 4, "world_size": 1, "shards": "shards"}
    assert [p.suffix for p in (checkpoint / "shards").iterdir()] == [".safetensors"]
    assert same_weights(export_checkpoint(tmp_path / "full", tmp_path / "midway"), full.final_dir)

    assert train(config(dataset, tmp_path / "split", parallel="fsdp"), stop_after=3).steps == 3
    rest = train(config(dataset, tmp_path / "split", parallel="fsdp"))  # from step 2's checkpoint
    assert [h["step"] for h in rest.history] == [3, 4]
    assert losses(rest.history) == losses(full.history[2:])
    with pytest.raises(InputError, match=r"other settings \(parallel: 'fsdp' -> 'ddp'\)"):
        train(config(dataset, tmp_path / "split", max_steps=6))

    def zero_mask_token(model):
        with torch.no_grad():
            model.mar.mask_token.zero_()

    assert edit_checkpoint(tmp_path / "split", zero_mask_token) == 4
    edited = tmp_path / "split" / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in edited.iterdir()) == ["meta.json", "rng_rank0.pt", "shards_edited"]
    assert not load_model(export_checkpoint(tmp_path / "split", tmp_path / "e")).mar.mask_token.detach().any()
    more = train(config(dataset, tmp_path / "split", parallel="fsdp", max_steps=5))  # from the edited weights
    assert [h["step"] for h in more.history] == [5]
    assert more.history[0]["t2i"] != train(config(dataset, tmp_path / "full", parallel="fsdp", max_steps=5)
                                           ).history[0]["t2i"]


def _torchrun(args: list[str], procs: int = 2) -> subprocess.CompletedProcess:
    """``torchrun`` of ``args`` on ``procs`` local processes (gloo, one thread each), which must succeed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_two_fsdp_processes_match_one_and_resume_exactly(dataset, tmp_path):
    """The same global batch on 1 process and sharded over 2 gloo processes gives the same losses; a run
    stopped after step 3 resumes from step 2's sharded checkpoint (each process wrote its shard) with the
    uninterrupted run's losses; the final model is gathered whole, and equals the checkpoint read back in one
    process. MAR's dropout draws from each process's own stream, so the model here has it off."""
    base = load_model(TINY_FIXTURE)
    settings = base.config.to_dict()
    settings["mar"].update(attn_dropout=0.0, proj_dropout=0.0)
    model_dir = save_model(load_state_dict(HarmonConfig.from_dict(settings), base.state_dict()), tmp_path / "model")
    one = train(config(dataset, tmp_path / "one", model=str(model_dir)))
    runs = {}
    for name in ("full", "split"):
        runs[name] = tmp_path / f"{name}.json"
        runs[name].write_text(json.dumps(config(dataset, tmp_path / name, model=str(model_dir),
                                                parallel="fsdp").to_dict()))
    _torchrun(["-m", "harmon.cli", "train", str(runs["full"])])
    (tmp_path / "stopping.py").write_text(STOPPING_RUN)
    _torchrun([str(tmp_path / "stopping.py"), str(runs["split"]), "3"])
    assert [r["step"] for r in _log(tmp_path / "split")] == [1, 2, 3]
    _torchrun(["-m", "harmon.cli", "train", str(runs["split"])])

    full, split = _log(tmp_path / "full"), _log(tmp_path / "split")
    assert [r["step"] for r in full] == [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(one.history, full):
        assert a["t2i"] == pytest.approx(b["t2i"], rel=1e-5) and a["i2t"] == pytest.approx(b["i2t"], rel=1e-5)
    assert losses(split) == losses(full)

    checkpoint = tmp_path / "full" / "checkpoints" / "step_0000004"
    assert json.loads((checkpoint / "meta.json").read_text())["world_size"] == 2
    assert len(list((checkpoint / "shards").glob("*.safetensors"))) == 2  # one a process
    final = tmp_path / "full" / "final"
    assert (final / "tokenizer.json").is_file()
    assert same_weights(export_checkpoint(tmp_path / "full", tmp_path / "read_back"), final)
    ours, reference = load_model(final).state_dict(), load_model(one.final_dir).state_dict()
    assert ours.keys() == reference.keys()
    assert max(float((ours[k] - reference[k]).abs().max()) for k in ours) < 1e-3


@pytest.mark.parametrize("parallel,precision", [("fsdp", "bfloat16"), ("ddp", "float32")])
def test_two_processes_go_on_past_unreadable_images(dataset, tmp_path, parallel, precision):
    """Each step one of the two processes finds its only caption image unreadable, and one its only
    conversation's: it runs a stand-in that weighs nothing, so both still run the same blocks (a sharded model
    needs that) and reduce the same losses for the log (without it the DDP processes' reductions stopped pairing
    up), and the run ends. With FSDP, the bfloat16 setting gathers parameters in bfloat16 and keeps float32
    weights."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"image": str(dataset / "images" / "0.png"), "caption": "a red square"}) + "\n" +
                      json.dumps({"image": "missing.png", "caption": "gone"}) + "\n")
    conversations = json.loads((dataset / "i2t.json").read_text())[:2]
    conversations[0]["image"], conversations[1]["image"] = str(dataset / "images" / "0.png"), "missing.png"
    (tmp_path / "broken.json").write_text(json.dumps(conversations))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config(dataset, tmp_path / "run", max_steps=2, parallel=parallel, precision=precision,
                                      data={"jsonl": [str(broken)], "llava": [str(tmp_path / "broken.json")],
                                            "t2i_batch_size": 2}).to_dict()))
    done = _torchrun(["-m", "harmon.cli", "train", str(path)])
    assert "skipped 4 unreadable images" in done.stdout
    log = _log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2] and all(r["t2i"] > 0 and r["i2t"] > 0 for r in log)
    final = load_model(tmp_path / "run" / "final")
    assert all(t.dtype == torch.float32 for t in final.state_dict().values())


def test_a_forged_meta_json_is_refused_before_anything_is_read_or_removed(dataset, tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    checkpoint = run / "checkpoints" / "step_0000001"
    checkpoint.mkdir(parents=True)
    elsewhere.mkdir()
    (run / "train_config.json").write_text(json.dumps(config(dataset, run, parallel="fsdp").to_dict()))
    (run / "checkpoints" / "latest").write_text("step_0000001")
    for meta in ({"step": 1, "world_size": 1, "shards": "../../elsewhere"},
                 {"step": "1", "world_size": 1, "shards": "shards"}):
        (checkpoint / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(InputError, match=r"meta.json is not a checkpoint's: it needs integer step"):
            export_checkpoint(run, tmp_path / "out")
        with pytest.raises(InputError, match=r"meta.json is not a checkpoint's"):
            edit_checkpoint(run, lambda model: None)
    assert elsewhere.is_dir()
