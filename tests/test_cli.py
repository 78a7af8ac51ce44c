"""The command line as a user meets it: exit codes and one-line errors, never tracebacks."""
import subprocess
import sys

import pytest


def raydd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "raydd", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert err.startswith("raydd: error:") and "\n" not in err, err
    for f in fragments:
        assert f in err, err


def test_help_lists_commands():
    proc = raydd("--help")
    assert proc.returncode == 0
    for cmd in ("data", "models", "teachers", "distill", "evaluate", "run", "rank", "export", "config"):
        assert cmd in proc.stdout


def test_models_list_names_the_zoo():
    proc = raydd("models", "list")
    assert proc.returncode == 0, proc.stderr
    names = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {"convnet", "resnet18", "vgg11", "mlp", "vit_tiny", "mobilenetv2"} <= names


def test_unknown_config_key(tmp_path):
    proc = raydd("teachers", "train", "configs/digits.yaml", "--set", "teachers.cout=3",
                 "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "teachers.cout")
    assert not (tmp_path / "run").exists()


def test_missing_src_for_prepare(tmp_path):
    proc = raydd("data", "prepare", "fashion-mnist", "--src", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "fm"))
    assert_one_line_error(proc, "nowhere")
    assert not any((tmp_path / "fm").glob("*.tar"))


def test_unknown_architecture_is_refused_before_work(tmp_path):
    proc = raydd("teachers", "train", "configs/digits.yaml", "--set", "teachers.arch=resnet9000",
                 "--set", f"data.dir={tmp_path / 'data'}", "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "resnet9000")
    assert not (tmp_path / "run" / "teachers").exists()


@pytest.mark.parametrize("argv", [["run", "no/such.yaml"], ["distill", "configs/digits.yaml", "--set", "distill.ipc=x"]])
def test_config_errors_exit_2(argv):
    assert_one_line_error(raydd(*argv))


TINY = ["--set", "teachers.count=2", "--set", "teachers.epochs=2", "--set", "teachers.arch=convnet:width=8",
        "--set", "distill.rounds=4", "--set", "distill.student_epochs=4", "--set", "distill.checkpoints=2",
        "--set", "distill.checkpoint_every=2", "--set", "evaluate.archs=[mlp]", "--set", "evaluate.seeds=1",
        "--set", "evaluate.epochs=5"]


def test_run_chains_all_stages_and_resumes(tmp_path, digits):
    out = tmp_path / "run"
    args = ["run", "configs/digits.yaml", "--set", f"data.dir={digits}", *TINY, "--out", str(out)]
    first = raydd(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    for path in ("config.yaml", "teachers/teachers.json", "synset/synset.safetensors", "synset/manifest.json",
                 "synset/grid.png", "eval/results.json", "eval/results.md", "eval/results.csv", "eval/plot.png"):
        assert (out / path).is_file(), path
    table = (out / "eval" / "results.md").read_text()
    assert "| mlp |" in table and "random" in table
    assert "| mlp |" in first.stdout  # the table is printed at the end
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = raydd(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed


# ---------------------------------------------------------------------------- a command line that explains itself
def test_version_and_help_with_an_example():
    import raydd as pkg
    proc = raydd("--version")
    assert proc.returncode == 0 and proc.stdout.startswith(f"raydd {pkg.__version__} (torch "), proc.stdout
    from raydd.cli import build_parser
    text = build_parser().format_help()
    assert "example" in text and "raydd run configs/digits.yaml" in text and "load_synset" in text


def test_output_cut_short_by_the_reader_ends_quietly():
    """`raydd models list --options | head -3`: the reader closes the pipe before raydd is done."""
    proc = subprocess.Popen([sys.executable, "-m", "raydd", "models", "list", "--options"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()   # before raydd writes its first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def _main(capsys, *argv):
    from raydd.cli import main
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_config_show_prints_every_key_with_defaults_and_overrides(tmp_path, capsys):
    import yaml

    from raydd.config import Config, flatten
    (tmp_path / "c.yaml").write_text("name: shown\n")
    code, out, _ = _main(capsys, "config", "show", str(tmp_path / "c.yaml"))
    shown = flatten(yaml.safe_load(out))
    assert code == 0 and set(shown) == set(flatten(Config().to_dict())) and shown["name"] == "shown"
    assert shown["distill.lr_img"] == Config().distill.lr_img == 1.0     # a default, printed
    code, out, _ = _main(capsys, "config", "show", str(tmp_path / "c.yaml"), "--set", "distill.lr_img=1e-3",
                         "--set", "distill.ipc=7")
    shown = flatten(yaml.safe_load(out))
    assert shown["distill.ipc"] == 7
    assert isinstance(shown["distill.lr_img"], float) and shown["distill.lr_img"] == 0.001


def test_yaml_exponent_without_a_dot_is_a_float(tmp_path):
    from raydd.config import load_config
    (tmp_path / "c.yaml").write_text("distill:\n  lr_img: 1e-3\n  lr_net: 5E-2\n")
    cfg = load_config(tmp_path / "c.yaml", ["distill.alpha=2e-1"])
    assert (cfg.distill.lr_img, cfg.distill.lr_net, cfg.distill.alpha) == (0.001, 0.05, 0.2)
    assert all(type(v) is float for v in (cfg.distill.lr_img, cfg.distill.lr_net, cfg.distill.alpha))
    assert load_config(None, ["name=1e3x"]).name == "1e3x" and load_config(None, ["distill.ipc=12"]).distill.ipc == 12


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndistill:\n  ipc: 2\n   rounds: 3\n")
    code, _, err = _main(capsys, "config", "show", str(bad))
    assert code == 2 and err.count("\n") == 1 and str(bad) in err and "line 4" in err, err
    (tmp_path / "dup.yaml").write_text("distill:\n  ipc: 2\n  ipc: 3\n")
    code, _, err = _main(capsys, "config", "show", str(tmp_path / "dup.yaml"))
    assert code == 2 and "duplicate key 'ipc'" in err and "line 3" in err, err


def test_models_list_options(capsys):
    code, out, _ = _main(capsys, "models", "list", "--options")
    lines = out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("convnet ")))
    opts = {line.split()[0]: line for line in lines[at + 1:at + 6]}
    assert code == 0 and set(opts) == {"width", "depth", "norm", "act", "pool"}
    assert "(default 128)" in opts["width"] and "instance" in opts["norm"]
    mlp = lines.index(next(line for line in lines if line.startswith("mlp ")))
    assert lines[mlp + 1].split()[0] == "width" and not lines[mlp + 3].startswith(" ")   # mlp: width, depth
    code, plain, _ = _main(capsys, "models", "list")
    assert not any(line.startswith(" ") for line in plain.splitlines())
