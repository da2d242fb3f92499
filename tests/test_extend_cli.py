"""``posemb extend`` end to end on a tiny LlamaForCausalLM made and briefly trained here (no downloads):
every method, the export reloaded by plain transformers (posemb blocked) with identical logits, a
rerun that reuses everything, a killed fine-tune that resumes, and bad input refused before any work."""
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from posemb.cli import main  # noqa: E402
from posemb.lab.data import RandomWindows, load_corpus  # noqa: E402
from posemb.lab.extend.finetune import FinetuneConfig, finetune  # noqa: E402
from posemb.lab.extend.hf_model import LogitsOnly, apply_setting, inspect_folder, load_model  # noqa: E402
from posemb.lab.extend.measure import sliding_window_perplexity  # noqa: E402
from posemb.lab.extend import methods as M  # noqa: E402
from posemb.lab.train import TrainConfig, train_model  # noqa: E402

TRAINED = 32
TARGET = 128


@pytest.fixture(scope="module")
def single_thread():
    # a 30k-parameter model on shared cores: one thread avoids contention between tiny kernels
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    text = b"\n".join((root / name).read_bytes() for name in ("argparse.py", "dataclasses.py", "textwrap.py"))
    path = tmp_path_factory.mktemp("data") / "code.txt"
    path.write_bytes(text)
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, data_file, single_thread):
    """Hidden 32, 2 layers, 256-byte vocabulary, trained 40 steps at length 32 on stdlib source."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=TRAINED,
                                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    corpus = load_corpus(data_file)
    train_model(LogitsOnly(model), RandomWindows(corpus.train, TRAINED, 16, 0),
                TrainConfig(train_length=TRAINED, batch_size=16, steps=40, lr=3e-3, warmup_steps=4), progress=False)
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(folder)
    return str(folder)


def _args(model, out, data, *extra):
    return ["extend", model, "--target-length", str(TARGET), "--data", data, "--out", str(out),
            "--eval-tokens", "1024", "--search-tokens", "512", "--search-budget", "5", "--passkey-samples", "2",
            "--passkey-depths", "0,1", "--no-progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def extended(tiny_llama, data_file, tmp_path_factory):
    """One full run: every method, fine-tune of none and linear, export of the best."""
    base = tmp_path_factory.mktemp("run")
    out, export = base / "report", base / "export"
    args = _args(tiny_llama, out, data_file, "--finetune-steps", "2", "--finetune-methods", "none,linear",
                 "--finetune-batch-size", "2", "--export", str(export))
    assert main(args) == 0
    return {"out": out, "export": export, "args": args,
            "results": json.loads((out / "results.json").read_text())}


def test_every_method_is_measured_and_reported(extended):
    rows = {r["label"]: r for r in extended["results"]["rows"]}
    expected = {"base"} | {f"{m}@{TARGET}" for m in M.METHODS} | {f"{m}@{TARGET}+ft2" for m in ("none", "linear")}
    assert set(rows) == expected
    lengths = extended["results"]["meta"]["eval_lengths"]
    assert lengths == [32, 64, 128, 256]  # trained length, up to and past the target
    for row in rows.values():
        for length in lengths:
            assert 1.0 < row["ppl"][str(length)]["ppl"] < 256.0  # a trained byte model: better than uniform
        assert {(c["length"], c["depth"]) for c in row["passkey"]} == {(64, 0.0), (64, 1.0), (128, 0.0), (128, 1.0)}
    # 'none' is the unchanged model: the same perplexity as the base at every length
    for length in lengths:
        assert rows[f"none@{TARGET}"]["ppl"][str(length)]["loss"] == pytest.approx(rows["base"]["ppl"][str(length)]["loss"])
    # the searched factors are the ones the longrope row used, and they are valid
    search = extended["results"]["meta"]["searches"][str(TARGET)]
    factors = rows[f"longrope@{TARGET}"]["setting"]["rope_parameters"]["long_factor"]
    assert factors == search["best"]["factors"] and M.check_factors(factors, 8) == factors
    assert search["best"]["fitness"] <= search["seed_best"]["fitness"]
    report = (extended["out"] / "report.md").read_text()
    for label in expected:
        assert f"`{label}`" in report
    assert "(a) @128" in report and "(b) @128" in report and "(c) @128" in report
    csv_lines = (extended["out"] / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(expected) and "verdict" in csv_lines[0]
    for name in ("ppl_vs_length.png", "passkey.png", "factors.png"):
        assert (extended["out"] / name).read_bytes()[:4] == b"\x89PNG"


def test_export_loads_without_posemb_and_gives_the_measured_logits(extended):
    export = extended["export"]
    meta = json.loads((export / "posemb_extend.json").read_text())
    config = json.loads((export / "config.json").read_text())
    assert config["rope_parameters"] == meta["rope_parameters"]
    assert config["max_position_embeddings"] == meta["max_position_embeddings"]
    script = textwrap.dedent("""
        import sys
        sys.modules["posemb"] = None  # importing posemb now fails: the folder must stand alone
        import torch
        from transformers import AutoModelForCausalLM
        probe = torch.load(sys.argv[2])
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
        with torch.no_grad():
            logits = model(input_ids=probe["input_ids"], use_cache=False).logits.float()
        print("IDENTICAL" if torch.equal(logits, probe["logits"]) else f"DIFFER {(logits - probe['logits']).abs().max()}")
    """)
    result = subprocess.run([sys.executable, "-c", script, str(export), str(extended["out"] / "export_probe.pt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "IDENTICAL"


def test_exported_folder_reproduces_the_measured_perplexity(extended, data_file):
    """The perplexity at the target, recomputed on the reloaded export, is the one in the report."""
    export = extended["export"]
    meta = json.loads((export / "posemb_extend.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    corpus = load_corpus(data_file)
    text = corpus.validation[: corpus.validation.numel() // 2]
    measured = sliding_window_perplexity(LogitsOnly(model), text[:1025], TARGET, TARGET // 2)
    assert measured["ppl"] == pytest.approx(meta["ppl_at_target"], rel=1e-9)
    assert meta["finetune_steps"] == 2  # fine-tuned rows are preferred for export


def test_rerun_reuses_every_measurement(extended, capsys):
    before = extended["results"]["rows"]
    args = [a for a in extended["args"] if a != "--no-progress"] + ["--force"]
    assert main(args) == 0
    assert "reused" in capsys.readouterr().err
    after = json.loads((extended["out"] / "results.json").read_text())["rows"]
    assert after == before


def test_killed_finetune_resumes_to_the_uninterrupted_weights(tiny_llama, data_file, tmp_path):
    info = inspect_folder(tiny_llama)
    setting = M.method_setting("yarn", info.geometry, TARGET)
    tokens = load_corpus(data_file).train
    config = FinetuneConfig(steps=4, batch_size=2, seed=0)

    def fresh():
        model = load_model(tiny_llama)
        apply_setting(model, setting)
        return model

    whole = fresh()
    finetune(whole, tokens, TARGET, config, checkpoint_path=tmp_path / "whole.pt")

    def die(step):
        if step == 2:
            raise KeyboardInterrupt

    killed = fresh()
    with pytest.raises(KeyboardInterrupt):
        finetune(killed, tokens, TARGET, config, checkpoint_path=tmp_path / "k.pt", checkpoint_every_steps=1,
                 on_step=die)
    resumed = fresh()
    result = finetune(resumed, tokens, TARGET, config, checkpoint_path=tmp_path / "k.pt")
    assert result.resumed_from_step == 2
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    original = load_model(tiny_llama)
    changed = any(not torch.equal(a, b) for a, b in zip(original.parameters(), whole.parameters()))
    assert changed  # the fine-tune did train, and the source folder still holds the original weights


def _refused(capsys, args, fragment):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert lines and lines[-1].startswith("posemb extend: error:") and fragment in lines[-1], err


def test_bad_input_is_refused_before_any_work(tiny_llama, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(capsys, _args(str(empty), out, data_file), "has no config.json")
    _refused(capsys, _args(str(tmp_path / "missing"), out, data_file), "is not a directory")
    study_run = tmp_path / "rope-seed0-abc"
    study_run.mkdir()
    (study_run / "run.json").write_text("{}")
    _refused(capsys, _args(str(study_run), out, data_file), "is a posemb study run")
    gpt2 = tmp_path / "gpt2"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=256,
                                                         n_positions=64)).save_pretrained(gpt2)
    _refused(capsys, _args(str(gpt2), out, data_file), "no rotary position embedding")
    args = _args(tiny_llama, out, data_file)
    args[args.index("--target-length") + 1] = str(TRAINED)
    _refused(capsys, args, f"--target-length {TRAINED} must be above the trained length {TRAINED}")
    _refused(capsys, _args(tiny_llama, out, data_file, "--methods", "linear,rerope"), "--methods must be one of")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    _refused(capsys, _args(tiny_llama, out, data_file, "--export", str(blocker / "export")), "cannot be written")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("the user's")
    _refused(capsys, _args(tiny_llama, out, data_file, "--export", str(taken)), "--force")
    _refused(capsys, _args(tiny_llama, out, data_file, "--export", tiny_llama, "--force"), "source MODEL folder")
    assert not out.exists()  # nothing was measured or written
    assert (taken / "mine.txt").read_text() == "the user's"


def test_already_scaled_model_is_refused(tiny_llama, tmp_path, capsys, data_file):
    import shutil

    scaled = tmp_path / "scaled"
    shutil.copytree(tiny_llama, scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (scaled / "config.json").write_text(json.dumps(config))
    _refused(capsys, _args(str(scaled), tmp_path / "out", data_file), "already uses rope_type 'linear'")


def test_gradient_checkpointing_trains_the_same_weights(tiny_llama, data_file, tmp_path):
    """The memory-saving option for large models recomputes activations: same gradients, same weights."""
    info = inspect_folder(tiny_llama)
    setting = M.method_setting("linear", info.geometry, TARGET)
    tokens = load_corpus(data_file).train
    trained = []
    for checkpointing in (False, True):
        model = load_model(tiny_llama)
        apply_setting(model, setting)
        finetune(model, tokens, TARGET, FinetuneConfig(steps=2, batch_size=2, gradient_checkpointing=checkpointing))
        trained.append(model)
    assert not trained[1].is_activation_checkpointing  # switched off again after the fine-tune
    for a, b in zip(trained[0].parameters(), trained[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_demo_model_is_a_llama_trained_with_the_study_recipe(tmp_path, data_file, single_thread):
    from posemb.lab.extend.demo_model import demo_recipe, train_demo_model
    from posemb.lab.study import PROFILES

    llama, train = demo_recipe()
    quick = PROFILES["quick"]
    assert (llama["hidden_size"], llama["num_hidden_layers"], llama["num_attention_heads"]) == \
        (quick["model"].dim, quick["model"].depth, quick["model"].heads)
    assert llama["max_position_embeddings"] == train.train_length == quick["train"].train_length
    assert (train.steps, train.lr, train.batch_size) == (quick["train"].steps, quick["train"].lr, quick["train"].batch_size)
    # SwiGLU's three matrices hold as many weights as the study's two 4x GELU ones
    assert 3 * llama["intermediate_size"] == pytest.approx(2 * 4 * llama["hidden_size"], rel=0.01)

    folder = tmp_path / "demo-model"
    marker = train_demo_model(folder, steps=2, data=data_file, progress=False)
    assert marker["result"]["steps"] == 2
    info = inspect_folder(folder)
    assert info.architecture == "LlamaForCausalLM" and info.geometry.trained_length == 128
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert train_demo_model(folder, steps=2, data=data_file, progress=False) == marker  # reused, not retrained
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_demo_arguments():
    import argparse

    from posemb.lab.extend.command import DEMO, add_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    config = config_from_args(parser.parse_args(["extend", "--demo"]))
    assert config.target_lengths == (512, 1024) == tuple(4 * 128 * k for k in (1, 2))
    assert config.finetune.steps == DEMO["finetune_steps"] and config.finetune_methods == DEMO["finetune_methods"]
    assert config.model.endswith("demo-model") and config.export.endswith("export")
    with pytest.raises(ValueError, match="either MODEL or --demo"):
        config_from_args(parser.parse_args(["extend", "somewhere", "--demo"]))
    with pytest.raises(ValueError, match="--target-length is required"):
        config_from_args(parser.parse_args(["extend", "somewhere"]))


def test_a_tokenizer_model_is_measured_in_its_own_tokens(tmp_path, data_file, single_thread):
    """A folder with a tokenizer (built here from the data, no download): perplexity windows and passkey
    samples are token ids of exactly the asked length, the key whole tokens at the end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from posemb.lab.extend.codec import Codec
    from posemb.lab.extend.measure import passkey_grid, passkey_set

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([data_file], trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "tok-llama"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    info = inspect_folder(folder)
    codec = Codec(info)
    assert not codec.byte_level
    ids = codec.from_bytes(load_corpus(data_file).validation, 500)
    assert ids.numel() == 500 and int(ids.max()) < fast.vocab_size
    rows, answer = passkey_set(codec, 96, 0.5, 3, seed=0)
    assert rows.shape == (3, 97) and answer >= 1
    key = fast.decode(rows[0, -answer:].tolist())
    assert key.isdigit() and len(key) == 5
    model = LogitsOnly(load_model(folder))
    cells = passkey_grid(model, codec, [96], [0.0, 1.0], samples=2)
    assert [c["accuracy"] for c in cells] == [0.0, 0.0]  # an untrained model does not find keys
    result = sliding_window_perplexity(model, ids, 64, 32)
    assert result["tokens"] == 64 + 32 * (len(result["window_losses"]) - 1)
    assert fast.vocab_size * 0.5 < result["ppl"] < fast.vocab_size * 2  # untrained: about uniform
