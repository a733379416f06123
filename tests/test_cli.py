"""The `iar-jax` command line: every subcommand's --help, and bad inputs as one-line errors.

The bad-input table runs each row in a fresh process (the way a user meets it) and asserts: a
non-zero exit, no traceback, exactly one `error:` line naming the flag, file or value, and no file
in the working directory created, changed or removed. All rows fail before anything is compiled,
so the processes run side by side in a few seconds each.
"""
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from iar_jax import cli, console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(REPO, "configs")


def _env():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
           "IAR_JAX_HUGE_PAGES": "0"}
    env.pop("XLA_FLAGS", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the CLI's own default, as for a user
    return env


def run_all(arg_lists, cwd=REPO):
    def one(args):
        return subprocess.run([sys.executable, "-m", "iar_jax.cli", *args], env=_env(), cwd=cwd,
                              capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, arg_lists))


# ----------------------------------------------------------------------------------------------
# --help

MAIN_FLAGS = {
    "demo": ["--workdir", "--variant", "--preset"],
    "train_tokenizer": ["--config=", "--workdir"],
    "reconstruct": ["--tokenizer", "--out", "--image_dir"],
    "rearrange": ["--tokenizer", "--cluster_size", "--out"],
    "extract_codes": ["--tokenizer", "--dataset", "--data_path", "--out", "--image_size"],
    "train": ["--config=", "--workdir"],
    "sample": ["--config=", "--workdir", "--tokenizer", "--out", "--per_class", "--cfg_scale", "--guidance"],
    "evaluate": ["--samples", "--ref", "--weights", "--out", "--feature"],
    "experiment": ["--config=", "--workdir"],
    "convert": ["--kind", "--config=", "--torch", "--out", "--params", "--to_torch"],
}


def test_every_subcommand_help_lists_its_own_flags():
    assert set(MAIN_FLAGS) == set(cli.SUBCOMMANDS)
    names = list(MAIN_FLAGS)
    procs = run_all([[n, "--help"] for n in names] + [["--help"]])
    for name, p in zip(names, procs):
        assert p.returncode == 0, (name, p.stderr[-2000:])
        out = p.stdout
        assert out.startswith(f"usage: iar-jax {name} "), name
        flag_lines = [ln for ln in out.splitlines() if ln.startswith("  --")]
        for flag in MAIN_FLAGS[name]:
            assert any(ln.startswith("  " + flag) for ln in flag_lines), (name, flag)
        assert all("default:" in ln or "required" in ln for ln in flag_lines), name
        assert "--xla_" not in out and "--only_check_args" not in out and len(flag_lines) < 30, name  # no absl flags
    top = procs[-1]
    assert top.returncode == 0
    for name, (_, line) in cli.SUBCOMMANDS.items():
        assert f"  {name} " in top.stdout and line in top.stdout


# ----------------------------------------------------------------------------------------------
# Bad inputs

@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    """A working directory with a tiny tokenizer and the kinds of bad files users pass."""
    import jax

    from iar_jax.checkpointing import Checkpointer
    from iar_jax.tokenizer import VQConfig, abstract_params
    from iar_jax.tokenizer.config import model_meta

    d = tmp_path_factory.mktemp("cli_wd")
    cfg = VQConfig(codebook_size=64, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=16, ch=8,
                   num_res_blocks=1, norm_groups=4)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract_params(cfg))
    ckpt = Checkpointer(str(d / "tok" / "checkpoints"), async_save=False)
    ckpt.save(0, {"params": params}, {}, {"kind": "tokenizer_train_state", "model_family": "tokenizer",
                                          "model": model_meta(cfg)}, force=True)
    ckpt.close()
    (d / "file.txt").write_text("not a directory")
    np.savez(d / "empty.npz")
    np.savez(d / "float.npz", arr_0=rng.uniform(-1, 1, (8, 28, 28, 3)).astype(np.float32))
    np.savez(d / "chw.npz", arr_0=np.zeros((8, 3, 32, 32), np.uint8))
    np.savez(d / "big.npz", arr_0=np.zeros((8, 32, 32, 3), np.uint8))
    np.savez(d / "ok.npz", arr_0=np.zeros((8, 28, 28, 1), np.uint8), arr_1=np.arange(8))
    np.savez(d / "badlabels.npz", arr_0=np.zeros((8, 28, 28, 1), np.uint8), arr_1=np.linspace(0, 1, 8))
    np.savez(d / "codes_float.npz", codes=rng.uniform(0, 1, (32, 16)), labels=np.zeros(32, np.int32))
    np.savez(d / "codes_big.npz", codes=rng.integers(0, 512, (32, 16)), labels=np.zeros(32, np.int32))
    np.savez(d / "codes_grid.npz", codes=rng.integers(0, 256, (32, 49)), labels=np.zeros(32, np.int32))
    np.save(d / "mapping512.npy", np.arange(512))
    (d / "folder" / "a").mkdir(parents=True)
    (d / "folder" / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (d / "bad.pt").write_bytes(b"not a torch file")
    (d / "out_dir").mkdir()
    return d


def snapshot(root):
    out = {}
    for r, _, files in os.walk(root):
        for f in files:
            p = os.path.join(r, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


TINY, TOK_CFG = f"--config={CFG}/iar.py:tiny", f"--config={CFG}/tokenizer.py:tiny"
# (id, args, what the error line must name); paths are relative to the working directory.
ROWS = [
    ("train: missing config file", ["train", "--config=nope.py", "--workdir=w"], "nope.py"),
    ("train: unknown config size", ["train", f"--config={CFG}/iar.py:huge", "--workdir=w"], "'huge'"),
    ("train: unknown override key", ["train", TINY, "--config.train.foo=1", "--workdir=w"], "--config.train.foo"),
    ("train: non-numeric override", ["train", TINY, "--config.train.num_steps=abc", "--workdir=w"],
     "--config.train.num_steps=abc"),
    ("train: workdir is a file", ["train", TINY, "--workdir=file.txt"], "--workdir=file.txt"),
    ("train: no workdir", ["train", TINY], "--workdir"),
    ("train: missing mapping file", ["train", TINY, "--workdir=w", "--config.loss.mapping_file=nope.npy"],
     "--config.loss.mapping_file=nope.npy"),
    ("train: mapping of another codebook", ["train", TINY, "--workdir=w", "--config.loss.mapping_file=mapping512.npy"],
     "vocab=512"),
    ("train: missing codes", ["train", TINY, "--workdir=w", "--config.data.source=npy", "--config.data.path=nope.npz"],
     "--config.data.path=nope.npz"),
    ("train: float codes", ["train", TINY, "--workdir=w", "--config.data.source=npy",
                            "--config.data.path=codes_float.npz"], "codes_float.npz"),
    ("train: codes of a bigger vocab", ["train", TINY, "--workdir=w", "--config.data.source=npy",
                                        "--config.data.path=codes_big.npz"], "vocab"),
    ("train: codes of another grid", ["train", TINY, "--workdir=w", "--config.data.source=npy",
                                      "--config.data.path=codes_grid.npz"], "grid=7"),
    ("train_tokenizer: workdir is a file", ["train_tokenizer", TOK_CFG, "--workdir=file.txt"], "--workdir=file.txt"),
    ("train_tokenizer: unknown dataset", ["train_tokenizer", TOK_CFG, "--workdir=w", "--config.data.name=cifar"],
     "'cifar'"),
    ("train_tokenizer: missing npz", ["train_tokenizer", TOK_CFG, "--workdir=w", "--config.data.name=npz",
                                      "--config.data.path=nope.npz"], "nope.npz"),
    ("evaluate: missing samples", ["evaluate", "--samples=nope.npz", "--ref=ok.npz"], "--samples=nope.npz"),
    ("evaluate: empty npz", ["evaluate", "--samples=empty.npz", "--ref=ok.npz"], "empty.npz"),
    ("evaluate: float images", ["evaluate", "--samples=float.npz", "--ref=ok.npz", "--feature=small_cnn"], "float32"),
    ("evaluate: channels-first images", ["evaluate", "--samples=chw.npz", "--ref=ok.npz"], "chw.npz"),
    ("evaluate: small-CNN on 32x32", ["evaluate", "--samples=big.npz", "--ref=ok.npz", "--feature=small_cnn"],
     "big.npz"),
    ("evaluate: float labels", ["evaluate", "--samples=badlabels.npz", "--ref=ok.npz", "--feature=small_cnn"],
     "badlabels.npz"),
    ("evaluate: missing ref", ["evaluate", "--samples=ok.npz", "--ref=nope.npz"], "--ref=nope.npz"),
    ("evaluate: out not writable", ["evaluate", "--samples=ok.npz", "--ref=ok.npz", "--feature=small_cnn",
                                    "--out=/sys/iar_jax_report.json"], "--out=/sys/iar_jax_report.json"),
    ("evaluate: out is a directory", ["evaluate", "--samples=ok.npz", "--ref=ok.npz", "--feature=small_cnn",
                                      "--out=out_dir"], "--out=out_dir"),
    ("evaluate: missing weights", ["evaluate", "--samples=ok.npz", "--ref=ok.npz", "--weights=nope.pt"], "nope.pt"),
    ("evaluate: bad integer flag", ["evaluate", "--samples=ok.npz", "--ref=ok.npz", "--batch_size=abc"],
     "--batch_size=abc"),
    ("sample: missing workdir", ["sample", TINY, "--workdir=nope", "--tokenizer=tok", "--out=s", "--per_class=1"],
     "--workdir=nope"),
    ("sample: non-numeric cfg scale", ["sample", TINY, "--workdir=tok", "--tokenizer=tok", "--out=s",
                                       "--cfg_scale=abc"], "--cfg_scale=abc"),
    ("sample: fractional top-k", ["sample", TINY, "--workdir=tok", "--tokenizer=tok", "--out=s", "--top_k=1.5"],
     "--top_k=1.5"),
    ("sample: out is a file", ["sample", TINY, "--workdir=tok", "--tokenizer=tok", "--out=file.txt", "--per_class=1"],
     "--out=file.txt"),
    ("sample: missing tokenizer", ["sample", TINY, "--workdir=tok", "--tokenizer=nope", "--out=s"], "--tokenizer=nope"),
    ("extract_codes: missing tokenizer", ["extract_codes", "--tokenizer=nope", "--out=c"], "--tokenizer=nope"),
    ("extract_codes: out is a file", ["extract_codes", "--tokenizer=tok", "--out=file.txt"], "--out=file.txt"),
    ("extract_codes: missing data path", ["extract_codes", "--tokenizer=tok", "--dataset=image_folder",
                                          "--data_path=nope", "--out=c"], "--data_path=nope"),
    ("extract_codes: unknown dataset", ["extract_codes", "--tokenizer=tok", "--dataset=cifar", "--out=c"], "'cifar'"),
    ("rearrange: missing tokenizer", ["rearrange", "--tokenizer=nope", "--out=r"], "--tokenizer=nope"),
    ("rearrange: out is a file", ["rearrange", "--tokenizer=tok", "--out=file.txt"], "--out=file.txt"),
    ("reconstruct: missing tokenizer", ["reconstruct", "--tokenizer=nope", "--out=r"], "--tokenizer=nope"),
    ("reconstruct: missing image dir", ["reconstruct", "--tokenizer=tok", "--out=r", "--image_dir=nope"],
     "--image_dir=nope"),
    ("convert: missing .pt", ["convert", "--kind=llamagen_gpt", TINY, "--torch=nope.pt", "--out=cv"], "--torch=nope.pt"),
    ("convert: not a torch file", ["convert", "--kind=llamagen_gpt", TINY, "--torch=bad.pt", "--out=cv"], "bad.pt"),
    ("convert: unknown kind", ["convert", "--kind=nope", "--torch=bad.pt", "--out=cv"], "--kind=nope"),
    ("convert: existing --to_torch", ["convert", "--kind=llamagen_gpt", TINY, "--params=tok", "--to_torch=file.txt"],
     "--to_torch=file.txt"),
    ("demo: workdir is a file", ["demo", "--workdir=file.txt"], "--workdir=file.txt"),
    ("demo: unknown variant", ["demo", "--workdir=dm", "--variant=iar3"], "--variant=iar3"),
    ("experiment: workdir is a file", ["experiment", "--workdir=file.txt"], "--workdir=file.txt"),
    ("unknown subcommand", ["trian"], "'trian'"),
]
# Rows that fail part-way (a corrupt file is only found when it is read): files may be added,
# never changed or removed.
PARTIAL = [
    ("extract_codes: corrupt JPEG", ["extract_codes", "--tokenizer=tok", "--dataset=image_folder", "--data_path=folder",
                                     "--image_size=8", "--num_workers=1", "--out=c_partial"], "bad.jpg"),
]


def _error_lines(stderr):
    # tqdm bars share stderr; they are not messages.
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]


@pytest.mark.slow  # one CLI process per bad input: ~3.5 min on 2 CPU cores
def test_bad_inputs_are_one_line_errors(wd):
    rows = ROWS + PARTIAL
    before = snapshot(wd)
    procs = run_all([args for _, args, _ in rows], cwd=str(wd))
    failures = []
    for (name, _, must_name), p in zip(rows, procs):
        lines = _error_lines(p.stderr)
        errors = [ln for ln in lines if "error:" in ln]
        ok = (p.returncode not in (0, None) and "Traceback" not in p.stderr and len(errors) == 1 and len(lines) == 1
              and must_name in errors[0])
        if not ok:
            failures.append(f"{name}: rc={p.returncode} stderr={p.stderr[-600:]!r}")
    assert not failures, "\n".join(failures)
    after = snapshot(wd)
    partial_out = {"c_partial"}
    assert {k: v for k, v in after.items() if k.split(os.sep)[0] not in partial_out} == before


# ----------------------------------------------------------------------------------------------
# Progress line and config.json


def test_progress_line_text_and_modes():
    log = io.StringIO()
    line = console.ProgressLine(100, stream=log, live=False, name="train")
    line.on_step(11)  # the first step run here: rates count from step 10 (a resumed run)
    line.t0 -= 10.0  # as if 10 s had passed since
    line.on_step(30)
    line.on_log(30, {"loss": 2.5})
    # 20 steps in 10 s = 2 steps/s; 70 steps left -> 35 s.
    assert log.getvalue() == "train: step 30/100  loss 2.5000  2 steps/s  ETA 0:00:35\n"
    line.close()
    assert log.getvalue().count("\n") == 1  # logs get one line per interval, nothing at close

    tty = io.StringIO()
    live = console.ProgressLine(10, stream=tty, live=True, redraw_secs=0.02)
    live.on_step(1, {"loss": np.float32(4.0)})
    live.last_draw = 0.0  # due for a redraw
    live.on_step(2, {"loss": np.float32(3.0)})
    live.on_log(2, {"loss": 3.0})  # terminals: nothing extra per log interval
    live.close()
    out = tty.getvalue()
    assert "\r\033[K" in out and "step 2/10  loss 3.0000" in out and out.endswith("\n")


def test_config_json_keeps_an_earlier_different_config(tmp_path):
    from iar_jax.config_lib import load_config

    c = load_config(f"{CFG}/iar.py:tiny")
    path = console.write_config_json(c, str(tmp_path))
    first = open(path).read()
    assert console.write_config_json(c, str(tmp_path)) == path and sorted(os.listdir(tmp_path)) == ["config.json"]
    c.train.num_steps = 7
    console.write_config_json(c, str(tmp_path))
    assert open(tmp_path / "config.1.json").read() == first
    import json

    assert json.load(open(path))["train"]["num_steps"] == 7


# ----------------------------------------------------------------------------------------------
# Installs and launch scripts


def test_accelerator_extras_share_the_jax_pin():
    import ast

    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    pin = next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "JAX")
    call = next(n.value for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call))
    kw = {k.arg: k.value for k in call.keywords}
    extras = {ast.literal_eval(k): [ast.unparse(e) for e in v.elts] for k, v in zip(kw["extras_require"].keys,
                                                                                     kw["extras_require"].values)}
    assert "'jax' + JAX" in [ast.unparse(e) for e in kw["install_requires"].elts]
    assert extras["cuda12"] == ["'jax[cuda12]' + JAX"] and extras["tpu"] == ["'jax[tpu]' + JAX"]
    assert pin.startswith((">=", "=="))


def _bash(script, *args, env=None):
    return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def _words(line):
    """How bash splits a printed command line (pasting it)."""
    p = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line], capture_output=True,
                       text=True, check=True)
    return p.stdout.split("\0")[:-1]


def test_launch_scripts_need_the_repo_and_print_pasteable_commands():
    p = _bash("tpu_pod.sh", "--dry-run", "--workdir=gs://b/run", env={"IAR_JAX_REPO": ""})
    assert p.returncode == 2 and "--repo" in p.stderr and p.stdout == ""
    extra = "--config.data.path=gs://b/my codes"
    p = _bash("tpu_pod.sh", "--dry-run", "--repo=https://example.org/u/iar-jax.git", "--workdir=gs://b/run",
              "--", extra)
    assert p.returncode == 0, p.stderr
    create, setup, train = p.stdout.strip().splitlines()
    assert _words(create)[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    setup_cmd = _words(setup)[-1].split("=", 1)[1]
    assert "git clone https://example.org/u/iar-jax.git iar-jax" in setup_cmd and "'.[tpu]'" in setup_cmd
    train_cmd = _words(train)[-1].split("=", 1)[1]  # the remote shell parses it once more
    import shlex

    assert shlex.split(train_cmd) == ["cd", "iar-jax", "&&", "iar-jax", "train", "--config=configs/iar.py:b",
                                 "--workdir=gs://b/run", extra]
    p = _bash("gpu_node.sh", "--dry-run", "--install", "--workdir=/ckpt/run", "--", extra)
    install, cmd = p.stdout.strip().splitlines()
    assert _words(install) == ["pip", "install", "-e", REPO + "[cuda12]"]
    assert _words(cmd)[1:] == ["iar-jax", "train", "--config=configs/iar.py:b", "--workdir=/ckpt/run", extra]
