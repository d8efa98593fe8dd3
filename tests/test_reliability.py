"""Bad input and faults, the way a new user meets them: every case exits with its status and a message that names
the problem, and leaves the disk as it should (nothing lost, nothing half-written)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers

from conftest import build_tiny, write_text
from layercut.cli import main
from layercut.files import STAGING_MARK, backup_path

FAST = ["--seq-len", "16", "--calib-windows", "4", "--ppl-windows", "4", "--gate-steps", "2", "--heal-steps", "2",
        "--heal-batch", "2", "--heal-windows", "4", "--heal-top-k", "8"]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time, and every folder: the state on disk. (A
    folder's own time changes when layercut probes that it can write there; its contents may not.)"""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        state[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns) if path.is_file() else (-1, 0)
    return state


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    """``p/llama`` (a tiny model), ``p/sibling`` (another folder beside it), ``text.txt``, and ``previous/``, an
    earlier prune output."""
    root = tmp_path_factory.mktemp("world")
    for name in ("llama", "sibling"):
        build_tiny("llama").save_pretrained(root / "p" / name)
        tiny_tokenizer.save_pretrained(root / "p" / name)
    write_text(root)
    assert main(["prune", str(root / "p" / "llama"), "--segment", "1:2", "--heal", "none", "--output",
                 str(root / "previous"), *data(root), *FAST[:6]]) == 0
    return root


def data(root: Path) -> list[str]:
    return ["--calib", str(root / "text.txt"), "--ppl", str(root / "text.txt")]


def refused(world: Path, capsys, argv: list[str], message: str, status: int = 2) -> str:
    """Run ``argv`` (``{w}`` is the world folder); assert the status, the message and an unchanged disk."""
    argv = [part.format(w=world) for part in argv]
    before = snapshot(world)
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == status, err
    assert message in err
    assert snapshot(world) == before
    return err


def prune(*extra: str) -> list[str]:
    return ["prune", "{w}/p/llama", "--segment", "1:2", "--calib", "{w}/text.txt", "--ppl", "{w}/text.txt", *FAST[:6],
            *extra]


# --------------------------------------------------------------------------------------- 1. data loss


def test_overwrite_never_deletes_the_folder_that_holds_the_source(world, capsys):
    refused(world, capsys, prune("--output", "{w}/p", "--overwrite"), "holds the source model")


def test_overwrite_never_deletes_the_source_itself(world, capsys):
    refused(world, capsys, prune("--output", "{w}/p/llama", "--overwrite"), "holds the source model")


def test_overwrite_never_deletes_a_folder_layercut_did_not_write(world, capsys):
    refused(world, capsys, prune("--output", "{w}/p/sibling", "--overwrite"), "is not a layercut output")


def test_overwrite_of_the_current_folder_is_refused_without_leftovers(world, capsys, monkeypatch):
    monkeypatch.chdir(world / "p" / "sibling")
    refused(world, capsys, prune("--output", ".", "--overwrite"), "is not a layercut output")
    assert sorted(p.name for p in (world / "p").iterdir()) == ["llama", "sibling"]


def test_quantize_never_overwrites_its_source(world, capsys):
    refused(world, capsys, ["quantize", "{w}/previous", "--scheme", "int8", "--output", "{w}/previous", "--overwrite",
                            *data(world)], "holds the source model")


def test_overwrite_replaces_an_earlier_output_and_nothing_else(world, capsys, tmp_path):
    out = tmp_path / "out"
    argv = [part.format(w=world) for part in prune("--heal", "none", "--output", str(out))]
    assert main(argv) == 0
    first = json.loads((out / "layercut.json").read_text())
    sources = snapshot(world / "p")
    assert main([*argv[:3], "2:4", *argv[4:], "--overwrite"]) == 0
    assert json.loads((out / "layercut.json").read_text())["segments"] == [[2, 4]] != first["segments"]
    assert snapshot(world / "p") == sources
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder, no backup


# --------------------------------------------------------------------------------------- 2. stale results


def compare_argv(model: str, out: str, *extra: str) -> list[str]:
    return ["compare", model, "--methods", "tail,angular", "--output", out, "--heal", "none",
            "--calib", "{w}/text.txt", "--ppl", "{w}/text.txt", *FAST[:6], *extra]


@pytest.fixture(scope="module")
def compared(world, tmp_path_factory):
    """A finished comparison of the tiny Llama (remove 2) in its own folder."""
    out = tmp_path_factory.mktemp("compared") / "cmp"
    argv = [part.format(w=world) for part in compare_argv("{w}/p/llama", str(out), "--remove", "2")]
    assert main(argv) == 0
    return out


def test_compare_refuses_cells_of_another_model(world, compared, capsys, tiny_tokenizer, tmp_path):
    build_tiny("gpt2").save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    before = snapshot(compared)
    argv = [part.format(w=world) for part in compare_argv(str(tmp_path / "gpt2"), str(compared), "--remove", "2")]
    assert main(argv) == 2
    assert "another model" in capsys.readouterr().err
    assert snapshot(compared) == before


def test_compare_refuses_cells_of_another_recipe_and_recomputes_with_overwrite(world, compared, capsys, tmp_path):
    copy = tmp_path / "cmp"
    subprocess.run(["cp", "-a", str(compared), str(copy)], check=True)
    before = snapshot(copy)
    argv = [part.format(w=world) for part in compare_argv("{w}/p/llama", str(copy), "--remove", "1")]
    assert main(argv) == 2
    assert "another recipe" in capsys.readouterr().err
    assert snapshot(copy) == before
    assert main([*argv, "--overwrite"]) == 0
    rows = json.loads((copy / "compare.json").read_text())["rows"]
    assert [sum(e - s for s, e in row["segments"]) for row in rows] == [1, 1]


# --------------------------------------------------------------------------------------- 3. broken model, exit 0


def test_infinite_learning_rate_is_refused_before_work(world, capsys):
    refused(world, capsys, prune("--heal", "endpoints", "--heal-lr", "inf", "--output", "{w}/never"),
            "--heal-lr (recipe key heal.heal_lr) must be a finite number")


def test_a_diverging_heal_stops_and_exports_nothing(world, capsys):
    err = refused(world, capsys, prune("--heal", "endpoints", "--heal-lr", "1e30", "--heal-steps", "3",
                                       "--heal-batch", "2", "--heal-windows", "4", "--heal-top-k", "8",
                                       "--output", "{w}/never"), "")
    assert "diverged" in err or "not finite" in err


# --------------------------------------------------------------------------------------- 4. options ignored


@pytest.mark.parametrize(("extra", "message"), [
    (["--remove", "5"], "give it without --remove or --ratio"),
    (["--ratio", "0.5"], "give it without --remove or --ratio"),
    (["--segments", "2"], "with --segment the segments are given"),
    (["--heal-lr", "0"], "--heal-lr (recipe key heal.heal_lr) must be greater than 0"),
    (["--heal-steps", "-5"], "--heal-steps (recipe key heal.heal_steps) must be greater than or equal to 1"),
    (["--heal-top-k", "0"], "--heal-top-k (recipe key heal.heal_top_k) must be greater than or equal to 1"),
    (["--last-k", "0"], "--last-k (recipe key heal.last_k) must be greater than or equal to 1"),
], ids=["segment+remove", "segment+ratio", "segment+segments", "heal-lr 0", "heal-steps -5", "top-k 0", "last-k 0"])
def test_an_option_that_would_be_ignored_or_replaced_is_refused(world, capsys, extra, message):
    refused(world, capsys, prune(*extra, "--output", "{w}/never"), message)


def test_compare_does_not_take_a_given_segment(world, capsys):
    refused(world, capsys, compare_argv("{w}/p/llama", "{w}/cmp-never", "--segment", "2:4"), "unrecognized arguments")
    (world / "segment.yaml").write_text("search:\n  segment: ['2:4']\n")
    try:
        refused(world, capsys, compare_argv("{w}/p/llama", "{w}/cmp-never", "--recipe", "{w}/segment.yaml"),
                "compare chooses the segments with each method")
    finally:
        (world / "segment.yaml").unlink()


@pytest.mark.parametrize(("text", "message"), [
    ("heal:\n  heal_steps: 2.9\n", "--heal-steps (recipe key heal.heal_steps) must be a valid integer; got 2.9"),
    ("heal:\n  heal_steps: true\n", "--heal-steps (recipe key heal.heal_steps) must be a valid integer; got True"),
    ("search:\n  segment: 2:4\n", "quote it in a YAML recipe"),
    ("search:\n  gate_lr: .inf\n", "--gate-lr (recipe key search.gate_lr) must be a finite number"),
    ("data: [1, 2]\n", "recipe section 'data' must be a mapping"),
    ("searches:\n  remove: 2\n", "unknown recipe section(s) ['searches']"),
    ("search: {remove: 2\n", "is not valid YAML at line"),
], ids=["float for int", "bool for int", "sexagesimal segment", "infinite float", "list section", "unknown section",
        "malformed"])
def test_recipe_values_are_checked_as_strictly_as_flags(world, capsys, text, message):
    recipe = world / "bad.yaml"
    recipe.write_text(text)
    try:
        refused(world, capsys, ["prune", "{w}/p/llama", "--recipe", str(recipe), "--output", "{w}/never",
                                *data(world)], message)
    finally:
        recipe.unlink()


# --------------------------------------------------------------------------------------- 5. tracebacks


def broken_copy(world: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    subprocess.run(["cp", "-a", str(world / "p" / "llama"), str(folder)], check=True)
    return folder


def test_truncated_weights_name_the_file(world, capsys, tmp_path):
    folder = broken_copy(world, tmp_path, "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refused(world, capsys, ["prune", str(folder), "--segment", "1:2", "--output", "{w}/never", *data(world),
                            "--seq-len", "16"], "model.safetensors) may be truncated or damaged")


def test_a_model_without_a_language_model_head_names_its_class(world, capsys, tmp_path):
    folder = broken_copy(world, tmp_path, "headless")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaModel"]}))
    refused(world, capsys, ["prune", str(folder), "--segment", "1:2", "--output", "{w}/never", *data(world)],
            "architecture LlamaModel has no causal language-model head")


def test_a_binary_calibration_file_is_named(world, capsys, tmp_path):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    refused(world, capsys, ["search", "{w}/p/llama", "--remove", "1", "--calib", str(binary), "--seq-len", "16"],
            f"{binary} is not UTF-8 text")


def test_a_non_utf8_recipe_is_named(world, capsys, tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("search:\n  remove: 2  # größe\n".encode("latin-1"))
    refused(world, capsys, prune("--recipe", str(recipe), "--output", "{w}/never"), "is not UTF-8 text")


@pytest.mark.parametrize(("extra", "message"), [
    (["--batch-size", "0"], "--batch-size (recipe key data.batch_size) must be greater than or equal to 1"),
    (["--heal-lr", "-0.01"], "--heal-lr (recipe key heal.heal_lr) must be greater than 0"),
    (["--lora-rank", "-4"], "--lora-rank (recipe key heal.lora_rank) must be greater than or equal to 0"),
    (["--gate-windows", "0"], "--gate-windows (recipe key search.gate_windows) must be greater than or equal to 1"),
    (["--tau-start", "0"], "--tau-start (recipe key search.tau_start) must be greater than 0"),
    (["--seq-len", "5000"], "longer than the model's 256 positions"),
    (["--device", "cuda:7"], "cuda:7 is not available"),
    (["--device", "gpu"], "'gpu' is not a device"),
    (["--device-map", "auto", "--device", "cpu"], "give one of them"),
    (["--max-memory", "cpu=1GiB"], "add --device-map auto"),
    (["--tasks", "piqa,nope"], "is not a comma-separated list of tasks"),
    (["--seq-len", "2.5"], "invalid int value: '2.5'"),
], ids=["batch 0", "negative lr", "negative rank", "gate-windows 0", "tau 0", "seq-len > positions", "missing device",
        "not a device", "device and device-map", "max-memory alone", "unknown task", "float seq-len"])
def test_out_of_range_or_impossible_options_exit_2_before_loading(world, capsys, extra, message):
    refused(world, capsys, prune("--output", "{w}/never", *extra), message)


def test_quantize_negative_group_size(world, capsys):
    refused(world, capsys, ["quantize", "{w}/previous", "--scheme", "int8", "--group-size=-32", "--output",
                            "{w}/never", *data(world)], "--group-size (recipe key quantization.group_size) must be")


def test_compare_with_no_method(world, capsys):
    argv = compare_argv("{w}/p/llama", "{w}/cmp-never", "--remove", "2")
    argv[argv.index("tail,angular")] = ","
    refused(world, capsys, argv, "--methods names no method")


# --------------------------------------------------------------------------------------- 6. late checks


def test_output_under_a_file_is_refused_up_front(world, capsys):
    refused(world, capsys, prune("--output", "{w}/text.txt/out"), "which is a file, not a folder")


def test_output_in_a_folder_that_cannot_be_written_is_refused_up_front(world, capsys, tmp_path):
    if os.geteuid() == 0:  # root writes through permissions; sysfs refuses even root
        target = "/sys/layercut-never"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        target = str(locked / "out")
    refused(world, capsys, prune("--output", target), "cannot write into")


def test_compare_validates_before_it_writes_anything(world, capsys):
    refused(world, capsys, compare_argv("{w}/p/llama", "{w}/cmp-never", "--remove", "2", "--seq-len", "999"),
            "longer than the model's")
    refused(world, capsys, compare_argv("{w}/p/llama", "{w}/cmp-never", "--remove", "9"), "cannot remove 9 of 6")
    assert not (world / "cmp-never").exists()


def test_search_plots_never_overwrite_a_folder(world, capsys):
    refused(world, capsys, ["search", "{w}/p/llama", "--remove", "1", "--plots", "{w}/p/sibling", *data(world),
                            "--seq-len", "16"], "already exists")


# --------------------------------------------------------------------------------------- 7. leftovers


def test_a_staging_folder_left_by_kill_9_is_removed_by_the_next_run(world, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.layercut-staging-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (stale / STAGING_MARK).write_text(json.dumps({"pid": 999999, "target": str(out)}))
    unmarked = tmp_path / ".out.layercut-staging-1"  # not marked by layercut: left alone
    unmarked.mkdir()
    argv = [part.format(w=world) for part in prune("--heal", "none", "--output", str(out))]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.layercut-staging-1", "out"]


def test_an_output_left_between_the_renames_is_put_back(world, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [part.format(w=world) for part in prune("--heal", "none", "--output", str(out))]
    assert main(argv) == 0
    record = (out / "layercut.json").read_text()
    os.replace(out, backup_path(out))  # a run killed between its two renames leaves this
    assert main(argv) == 2  # the previous output is back, and --overwrite is still needed to replace it
    assert "already exists" in capsys.readouterr().err
    assert (out / "layercut.json").read_text() == record and not backup_path(out).exists()


# --------------------------------------------------------------------------------------- 8. slow wrong path


def test_a_missing_local_path_is_never_sent_to_the_hub(world, capsys, monkeypatch):
    import layercut.load

    monkeypatch.setattr(layercut.load, "hub_reachable", lambda *a: pytest.fail("asked the Hub for a local path"))
    monkeypatch.chdir(world)
    refused(world, capsys, ["prune", "p/nothing", "--segment", "1:2", "--output", "never", *data(world)],
            "model folder p/nothing does not exist")


def test_a_hub_id_while_the_hub_is_unreachable_fails_at_once(world, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(world, capsys, ["prune", "nobody/no-such-model", "--segment", "1:2", "--output", "{w}/never",
                            *data(world)], "the Hub cannot be reached")


# --------------------------------------------------------------------------------------- 9. rough edges


def test_exported_folders_get_the_permissions_of_the_umask(world, tmp_path):
    out = tmp_path / "out"
    umask = os.umask(0o022)
    try:
        assert main([part.format(w=world) for part in prune("--heal", "none", "--output", str(out))]) == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "layercut.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644


SIGNAL_RUN = textwrap.dedent("""
    import os, signal, sys
    import layercut.export
    real = layercut.export.model_card
    def card(*args, **kwargs):  # the weights are in the staging folder now
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        return real(*args, **kwargs)
    layercut.export.model_card = card
    from layercut.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "status", "line"), [("SIGINT", 130, "interrupted (SIGINT)"),
                                                     ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_a_signal_during_export_removes_the_staging_folder(world, tmp_path, name, status, line):
    out = tmp_path / "out"
    argv = [part.format(w=world) for part in prune("--heal", "none", "--output", str(out))]
    # A runner started in the background ignores SIGINT, and a child inherits that: give the child the default.
    done = subprocess.run([sys.executable, "-c", SIGNAL_RUN, name, *argv], capture_output=True, text=True,
                          check=False, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == status, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"layercut: {line}; nothing half-written was left"
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------- fault injection


KILL_RUN = textwrap.dedent("""
    import os, signal, sys
    where = sys.argv[1]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "heal":
        import layercut.heal
        real_loss, calls = layercut.heal.top_k_kl, []
        def loss(*args):
            calls.append(1)
            if len(calls) == 2:
                die()
            return real_loss(*args)
        layercut.heal.top_k_kl = loss
    elif where == "staging":
        import layercut.export
        layercut.export.model_card = lambda *args: die()
    elif where == "renames":
        real_replace = os.replace
        def replace(source, target):
            real_replace(source, target)
            if str(target).endswith(".layercut-old"):
                die()
        os.replace = replace
    from layercut.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def tree_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["heal", "staging", "renames"])
def test_kill_9_loses_neither_the_source_nor_the_earlier_output_and_a_rerun_works(world, tmp_path, where):
    out = tmp_path / "out"
    subprocess.run(["cp", "-a", str(world / "previous"), str(out)], check=True)
    source, earlier = tree_digest(world / "p" / "llama"), tree_digest(out)
    argv = [part.format(w=world) for part in prune("--heal", "endpoints", "--output", str(out), "--overwrite",
                                                   *FAST[6:])]
    argv[argv.index("1:2")] = "2:4"
    killed = subprocess.run([sys.executable, "-c", KILL_RUN, where, *argv], capture_output=True, text=True,
                            check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert tree_digest(world / "p" / "llama") == source
    left = {p.name for p in tmp_path.iterdir()}
    staging = {name for name in left if ".layercut-staging-" in name}
    assert len(staging) == (0 if where == "heal" else 1)
    assert all((tmp_path / name / STAGING_MARK).is_file() for name in staging)  # marked: the next run removes it
    if where == "renames":  # the earlier output waits whole under its documented name
        assert left - staging == {backup_path(out).name}
        assert tree_digest(backup_path(out)) == earlier
    else:
        assert left - staging == {"out"}
        assert tree_digest(out) == earlier
    rerun = subprocess.run([sys.executable, "-m", "layercut", *argv], capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} == {"out"}
    assert json.loads((out / "layercut.json").read_text())["segments"] == [[2, 4]]
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    assert tree_digest(world / "p" / "llama") == source
