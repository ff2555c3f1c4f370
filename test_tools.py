"""The tools beside the paper: Smooth as a library, results files, comparison, models and
checkpoints, data readers, train.py and certify.py end to end (one process and torchrun), and the
mistakes a user can make, each ending in one sentence. Run: python -m pytest -q test_macer.py
test_tools.py"""

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import norm

import certify
import data
import models
import records
import train
from certify import Smooth
from conftest import CUDA, DEVICES
from macer import macer_loss
from test_macer import Linear2, NaNWhere

HERE = os.path.dirname(os.path.abspath(__file__))
QUIET = lambda *a, **k: None


# ================================================================ Smooth as a library
def test_smooth_rejects_bad_arguments_with_a_sentence():
    model, x = Linear2([1.0, 0.0], 0.0), torch.zeros(2, dtype=torch.float64)
    good = dict(x=x, n0=10, n=100, alpha=0.001, batch_size=50, bound="clopper-pearson")
    for bad, words in [
        (dict(batch_size=0), "batch_size"),
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(n=0), "n must"),
        (dict(n=1, bound="bernstein"), "n >= 2"),
        (dict(bound="wald"), "bound"),
        (dict(x=x.view(1, 2)), "without a batch dimension"),
    ]:  # nn.Linear keeps the extra dimension
        with pytest.raises(ValueError, match=words):
            Smooth(nn.Linear(2, 2).double(), 2, 0.5).certify(**{**good, **bad})
    for args, words in [
        ((model, 2, -0.5), "sigma"),
        ((model, 2, 0.5, -1.0), "beta"),
        ((model, 1, 0.5), "num_classes"),
    ]:
        with pytest.raises(ValueError, match=words):
            Smooth(*args)
    with pytest.raises(
        ValueError, match="num_classes"
    ):  # a 10-class network certified as 2 classes
        Smooth(models.get_model("mnist"), 2, 0.5).certify(torch.rand(1, 28, 28), 10, 100, 0.001, 50)
    with pytest.raises(
        ValueError, match="without a batch dimension"
    ):  # LeNet's conv2d rejects (b, 1, 1, 28, 28)
        Smooth(models.get_model("mnist"), 10, 0.5).certify(
            torch.rand(1, 1, 28, 28), 10, 100, 0.001, 50
        )
    assert (
        Smooth(NaNWhere(math.inf), 2, 0.5).certify(x, 10, 100, 0.001, 50)[0] == 1
    )  # no parameters at all
    f = lambda x: nn.Linear(2, 2)(x)  # a function hides its float32 weights from Smooth
    with pytest.raises(
        ValueError, match="x is torch.float64 on cpu: give x the classifier.s dtype"
    ):
        Smooth(f, 2, 0.5).certify(x, 10, 100, 0.001, 50)


class Raises(nn.Module):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def forward(self, x):
        raise self.error


def test_a_classifier_error_keeps_its_message_and_out_of_memory_says_lower_the_batch():
    x = torch.zeros(2)
    with pytest.raises(RuntimeError, match="cuDNN went away") as e:
        Smooth(Raises(RuntimeError("cuDNN went away")), 2, 0.5).certify(x, 10, 100, 0.001, 50)
    assert "batch dimension" not in str(e.value)
    with pytest.raises(RuntimeError):  # no message at all: re-raised as it is
        Smooth(Raises(RuntimeError()), 2, 0.5).certify(x, 10, 100, 0.001, 50)
    wrong_device = RuntimeError("Expected all tensors to be on the same device, but found cuda:0")
    with pytest.raises(ValueError, match="give x the classifier's dtype and device"):
        Smooth(Raises(wrong_device), 2, 0.5).certify(x, 10, 100, 0.001, 50)
    with pytest.raises(MemoryError, match="lower batch_size"):
        Smooth(Raises(torch.OutOfMemoryError("CUDA out of memory")), 2, 0.5).certify(
            x, 10, 100, 0.001, 50
        )
    with pytest.raises(MemoryError, match="lower batch_size"):  # the CPU allocator's words
        Smooth(Raises(RuntimeError("DefaultCPUAllocator: can't allocate memory")), 2, 0.5).predict(
            x, 100, 0.001, 50
        )


def test_smooth_restores_each_modules_mode():
    """Certifying inside a training loop must not leave BatchNorm frozen: every module's mode comes
    back as it was, a submodule that was in eval mode included, after certify, predict and an
    error."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    net[1].eval()
    modes = [m.training for m in net.modules()]
    smooth = Smooth(net, 3, 0.25)
    seen = []
    net[2].register_forward_pre_hook(lambda m, inputs: seen.append(m.training))
    smooth.certify(torch.rand(4), 10, 50, 0.001, 25)
    smooth.predict(torch.rand(4), 50, 0.001, 25)
    assert seen and not any(seen)  # eval mode while sampling
    assert [m.training for m in net.modules()] == modes
    with pytest.raises(ValueError):
        smooth.certify(
            torch.rand(5), 10, 50, 0.001, 25
        )  # the wrong size: Linear(4, 8) fails inside
    assert [m.training for m in net.modules()] == modes


def test_largest_radius_is_where_every_sample_agrees():
    """The caps of n = 100,000, alpha = 0.001 at sigma 0.25, 0.5, 1.0 (results/README.md), and None
    where no input can be certified."""
    caps = [certify.largest_radius(s, 100_000, 0.001, "clopper-pearson") for s in (0.25, 0.5, 1.0)]
    assert [round(c, 3) for c in caps] == [0.953, 1.906, 3.811]
    assert caps[0] == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 100_000)))
    assert certify.largest_radius(0.5, 100_000, 0.001, "hoeffding") == pytest.approx(
        0.5 * norm.ppf(1 - math.sqrt(math.log(1000) / 2e5))
    )
    assert certify.largest_radius(0.25, 1, 0.001, "clopper-pearson") is None
    assert certify.largest_radius(0.25, 100, 1e-300, "bernstein") is None


# ================================================================ results files
def toy_set(labels=(0, 1, 0, 1, 0, 1)):
    return data.TensorImages(
        torch.zeros(len(labels), 1, 1, 3, dtype=torch.uint8), torch.tensor(labels)
    )


class Stub(nn.Module):
    """Always class 1: certify returns (1, sigma * PhiInv(alpha^(1/n)))."""

    def forward(self, x):
        return torch.tensor([[0.0, 1.0]]).expand(len(x), 2)


def test_soft_rs_takes_logits_whose_beta_multiple_overflows():
    """Logits of 3e37 are finite, but beta = 16 times them is not (float32): Soft-RS subtracts the
    top logit first, so z = softmax(beta * u) stays (0, 1) and the input is certified."""

    class Huge(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 3e37]]).expand(len(x), 2)

    smooth = Smooth(Huge(), 2, 0.25, beta=16.0)
    label, R = smooth.certify(torch.zeros(1, 1, 3), 10, 100, 0.001, 50, bound="bernstein")
    assert label == 1 and R == pytest.approx(
        0.25 * norm.ppf(certify.bernstein_lower(1, 0, 100, 0.001))
    )


def toy_settings(**change):
    return {
        **dict(
            checkpoint_sha256="aa",
            dataset="toy",
            test_set_sha256="t",
            normalize=True,
            sigma=0.25,
            beta=None,
            n0=10,
            n=100,
            alpha=0.001,
            bound="clopper-pearson",
            precision="fp32",
            seed=0,
            noise=records.NOISE,
            batch=50,
            noise_device="cpu",
        ),
        **change,
    }


def cert(out, indices, log=QUIET, overwrite=False, images=None, smooth=None, **change):
    settings = toy_settings(**change)
    smooth = smooth or Smooth(Stub(), 2, settings["sigma"])
    return records.certify_into(
        str(out),
        smooth,
        images or toy_set(),
        indices,
        settings,
        overwrite,
        log=lambda line, **k: log(line),
    )


def test_results_tsv_is_appended_and_resumed(tmp_path):
    out = tmp_path / "r.tsv"
    s1 = cert(out, [0, 2])
    lines = []
    s2 = cert(out, [0, 2, 4, 5], log=lines.append)
    rows = records.read_tsv(str(out))
    assert [r["idx"] for r in rows] == [0, 2, 4, 5] and "2 inputs done" in lines[0]
    assert Path(out).read_text().split("\n")[0] == records.HEADER
    R = 0.25 * norm.ppf(0.001 ** (1 / 100))
    assert (
        rows[0]["radius"] == pytest.approx(R, rel=1e-3)
        and rows[3]["correct"] == 1
        and rows[0]["correct"] == 0
    )
    assert (
        s1["inputs"] == 2 and s2["inputs"] == 4 and s2["acr"] == pytest.approx(R / 4, rel=1e-3)
    )  # only idx 5 is correct
    assert s2["seconds"] == pytest.approx(
        sum(r["time"] for r in rows), abs=0.005
    )  # the TSV keeps 3 decimals


def test_the_settings_record_is_written_when_the_file_starts_and_never_after(tmp_path):
    """A resume appends rows and leaves the record as it was made (here its informative machine
    field, edited, survives); --overwrite, which starts the file afresh, writes a new one."""
    out = tmp_path / "r.tsv"
    cert(out, [0])
    record = records.read_settings(str(out))
    Path(records.settings_path(str(out))).write_text(json.dumps(dict(record, machine="elsewhere")))
    cert(out, [0, 2])
    assert records.read_settings(str(out))["machine"] == "elsewhere"
    cert(out, [0, 4], overwrite=True, seed=5)  # another draw for new rows: afresh
    fresh = records.read_settings(str(out))
    assert fresh["seed"] == 5 and "machine" not in fresh


def test_compare_names_the_settings_that_differ_and_refuses_other_test_sets(tmp_path):
    """Rows made at n = 200 and n = 2000 (or at other sigmas or bounds) are compared with a note
    saying so; rows of other test sets are refused."""
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    for path, n in ((a, 200), (b, 2000)):
        write_tsv(path, [(0, 1, 1, 0.1), (1, 2, 2, 0.1)])
        record = dict(toy_settings(n=n), dataset="toy", test_set_sha256="x")
        Path(records.settings_path(str(path))).write_text(json.dumps(record))
    (pair,) = records.compare([str(a), str(b)])["pairs"]
    assert pair["notes"] == ["A and B differ in n: 200 against 2000"]
    assert "note: A and B differ in n" in records.format_comparison(
        records.compare([str(a), str(b)])
    )
    record["test_set_sha256"] = "y"
    Path(records.settings_path(str(b))).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="other test sets"):
        records.compare([str(a), str(b)])


def test_results_made_with_other_settings_are_never_mixed(tmp_path):
    out = tmp_path / "r.tsv"
    cert(out, [0, 1])
    for change in (
        dict(sigma=0.5),
        dict(checkpoint_sha256="bb"),
        dict(normalize=False),
        dict(dataset="other"),
        dict(test_set_sha256="u"),
    ):
        with pytest.raises(ValueError, match=f"other settings \\({next(iter(change))}\\)"):
            cert(out, [0, 1, 2], **change)
    s = cert(out, [0, 1, 2], sigma=0.5, overwrite=True)
    assert s["inputs"] == 3 and all(
        r["radius"] == pytest.approx(0.5 * norm.ppf(0.001**0.01), rel=1e-3)
        for r in records.read_tsv(str(out))
    )


def test_rows_drawn_otherwise_are_read_but_never_appended_to(tmp_path):
    """Another seed or batch: a complete file is still read, but new rows are refused (or
    --overwrite)."""
    out = tmp_path / "r.tsv"
    cert(out, [0, 1])
    assert cert(out, [0, 1], seed=1)["inputs"] == 2  # nothing to certify: read as it is
    with pytest.raises(ValueError, match=r"other noise settings \(seed: seed 0\)"):
        cert(out, [0, 1, 2], seed=1)
    with pytest.raises(ValueError, match=r"other noise settings \(batch: batch 50\)"):
        cert(out, [0, 1, 2], batch=7)
    assert cert(out, [0, 1, 2], seed=1, overwrite=True)["inputs"] == 3
    assert json.loads(Path(tmp_path / "r_settings.json").read_text())["seed"] == 1


def test_a_cut_off_last_row_is_dropped_and_certified_again(tmp_path):
    out = tmp_path / "r.tsv"
    cert(out, [0, 1, 2, 3])
    text = Path(out).read_text()
    Path(out).write_text(
        text[: text.rindex("\n", 0, -1) + 1] + "3\t1\t1\t0.2"
    )  # the last row, cut short
    lines = []
    s = cert(out, [0, 1, 2, 3, 4], log=lines.append)
    assert any("cut-off" in line for line in lines) and s["inputs"] == 5
    assert [r["idx"] for r in records.read_tsv(str(out))] == [0, 1, 2, 3, 4]
    assert Path(out).read_text().endswith("\n")


def test_a_crlf_file_without_its_last_newline_keeps_every_row(tmp_path):
    """As a Windows editor saves it: CRLF line ends, no newline after the last row. Every row is
    kept, none is certified again, and the new rows follow on lines of their own."""
    out = tmp_path / "r.tsv"
    cert(out, [0, 1, 2, 3])
    Path(out).write_bytes(Path(out).read_bytes().replace(b"\n", b"\r\n").rstrip(b"\r\n"))
    lines = []
    assert cert(out, [0, 1, 2, 3, 4], log=lines.append)["inputs"] == 5
    assert "resuming" in lines[0] and "4 inputs done, 1 to go" in lines[0]
    assert [r["idx"] for r in records.read_tsv(str(out))] == [0, 1, 2, 3, 4]


def test_a_written_radius_is_rounded_down_from_its_exact_value():
    """Just below a step of 1e-5, R * 1e5 rounds up in float64 (2.99996 from 2.9999599999999997);
    the row takes R's exact binary value, rounded down."""
    for R in (2.9999599999999997, 1e10 + 0.123456789, 0.5, 0.0, 0.9530000000000001):
        written = float(records.row_line(0, 1, 1, R, 0.1).split("\t")[3])
        assert written <= R < written + 1e-5 + 1e-9, R


def test_a_file_with_cr_line_ends_keeps_every_row(tmp_path):
    out = tmp_path / "r.tsv"
    cert(out, [0, 1, 2])
    Path(out).write_bytes(Path(out).read_bytes().replace(b"\n", b"\r"))  # old Mac line ends
    assert cert(out, [0, 1, 2, 3])["inputs"] == 4
    assert [r["idx"] for r in records.read_tsv(str(out))] == [0, 1, 2, 3]


def test_a_huge_radius_is_written_with_its_digits_and_read_back(tmp_path):
    """At sigma 1e300 the radius (about 2.6e300 here) is written exactly, not overflowing the
    rounding down to 5 decimals, and reads back as the certificate."""
    out = tmp_path / "r.tsv"
    cert(out, [1], sigma=1e300)
    (row,) = records.read_tsv(str(out))
    R = certify.largest_radius(1e300, 100, 0.001, "clopper-pearson")  # every sample agrees
    assert row["radius"] == R == pytest.approx(1e300 * norm.ppf(0.001 ** (1 / 100)), rel=1e-9)
    assert row["predict"] == 1 and records.read_rows(str(out)) == [row]


def test_an_empty_results_file_is_started_and_a_corrupt_one_refused(tmp_path):
    out = tmp_path / "r.tsv"
    out.write_text("")  # a kill during the first image
    assert cert(out, [0, 1])["inputs"] == 2
    out.write_text(records.HEADER + "\n0\t1\t1\t0.5\n1\t0\t1\t0.5\t0\t1.0\n")
    with pytest.raises(ValueError, match="line 2"):
        records.read_tsv(str(out))


def test_a_second_writer_is_refused(tmp_path):
    out = str(tmp_path / "r.tsv")
    f, _, _ = records.open_results(out, toy_settings(), [0], records.row_check(), log=QUIET)
    with pytest.raises(ValueError, match="another process"):
        records.open_results(out, toy_settings(), [0], records.row_check(), log=QUIET)
    f.close()
    records.open_results(out, toy_settings(), [0], records.row_check(), log=QUIET)[0].close()


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("radius", "5.00000", "outside"),
        ("radius", "nan", "outside"),
        ("radius", "inf", "outside"),
        ("radius", "-3", "outside"),
        ("predict", "42", "predict 42"),
        ("label", "0", "label 0 is not the test set's"),
        ("idx", "99", "not in the test set"),
        ("correct", "0", "correct is 0"),
    ],
)
def test_every_row_is_checked_against_its_settings_and_the_test_set(tmp_path, field, value, words):
    """A row edited by hand is refused, naming its line, when resumed, read or compared: never
    summed."""
    out = tmp_path / "r.tsv"
    cert(out, [1, 3, 5])
    lines = Path(out).read_text().splitlines()
    cols = records.HEADER.split("\t")
    row = lines[2].split("\t")
    row[cols.index(field)] = value
    lines[2] = "\t".join(row)
    Path(out).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"line 3 of .*{words}"):
        cert(out, [1, 3, 5])
    if field != "idx":  # without the test set, idx 99 is a valid row
        with pytest.raises(ValueError, match="line 3"):
            records.read_rows(str(out))
    if field == "radius":
        with pytest.raises(ValueError, match="line 3"):
            records.compare([str(out), str(out)])


def test_settings_and_paths_that_are_not_results_files_are_never_written(tmp_path):
    """--out at a text file, a config.json, a settings record: refused, and the file is unchanged;
    --out not ending in .tsv (col.tsv and col.txt would share col_settings.json) is refused."""
    for name, text in (
        ("notes.tsv", "hello\nworld"),
        ("config.json", '{"a": 1}'),
        ("r_settings.tsv", '{\n "sigma": 0.25\n}'),
    ):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError):
            cert(path, [0])
        assert path.read_text() == text
    with pytest.raises(ValueError, match="ending in .tsv"):
        cert(tmp_path / "col.txt", [0])
    with pytest.raises(ValueError, match="ending in .tsv"):
        cert(tmp_path, [0])  # a folder


@pytest.mark.parametrize("record", ["{", "", "[1]", "folder", "deleted"])
def test_a_broken_settings_record_is_named_and_overwrite_gets_past_it(tmp_path, record):
    out = tmp_path / "r.tsv"
    cert(out, [0, 1])
    rec = tmp_path / "r_settings.json"
    os.remove(rec)
    if record == "folder":
        rec.mkdir()
    elif record != "deleted":
        rec.write_text(record)
    with pytest.raises(ValueError, match="r_settings.json") as e:
        cert(out, [0, 1, 2])
    assert ("remove it" if record == "folder" else "--overwrite") in str(e.value)
    if record == "folder":
        rec.rmdir()
    assert cert(out, [0, 1, 2], overwrite=True)["inputs"] == 3


def test_noise_is_per_input_whatever_the_order_the_company_or_a_resume(tmp_path):
    """Input i's row depends on (seed, i) alone: certified among [a, b, c], alone, in reverse, or
    after an interruption, it is the same row."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 3))
    smooth = Smooth(net, 3, 0.5)
    dataset = data.TensorImages(
        torch.randint(0, 255, (6, 1, 1, 3), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2])
    )
    rows = lambda name: {
        r["idx"]: (r["predict"], r["radius"]) for r in records.read_tsv(str(tmp_path / name))
    }
    kw = dict(images=dataset, smooth=smooth, sigma=0.5, n=400)
    cert(tmp_path / "abc.tsv", [1, 3, 5], **kw)
    cert(tmp_path / "c.tsv", [5], **kw)
    cert(tmp_path / "cba.tsv", [5, 3, 1], **kw)
    cert(tmp_path / "ab_then_c.tsv", [1, 3], **kw)
    torch.manual_seed(123)  # the global RNG plays no part
    cert(tmp_path / "ab_then_c.tsv", [1, 3, 5], **kw)
    assert rows("c.tsv")[5] == rows("abc.tsv")[5] and rows("cba.tsv") == rows("abc.tsv") == rows(
        "ab_then_c.tsv"
    )
    assert (
        len({v[1] for v in rows("abc.tsv").values()}) == 3
    )  # the rows differ: the model does depend on x
    cert(tmp_path / "seed1.tsv", [1, 3, 5], seed=1, **kw)
    assert rows("seed1.tsv") != rows("abc.tsv")


def write_tsv(path, rows, time="0.1"):
    with open(path, "w") as f:
        f.write(
            records.HEADER
            + "\n"
            + "".join(f"{i}\t{y}\t{p}\t{r}\t{int(y == p)}\t{time}\n" for i, y, p, r in rows)
        )


def test_compare_against_a_hand_computed_case(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    write_tsv(
        a, [(0, 1, 1, 0.5), (1, 2, 2, 0.3), (2, 3, 0, 0.9), (7, 1, 1, 2.0)]
    )  # idx 7 only in A
    write_tsv(
        b, [(0, 1, 1, 0.8), (1, 2, 2, 0.3), (2, 3, 3, 0.1)], time="0:00:03.14"
    )  # Cohen et al.'s time column
    (c,) = records.compare([str(a), str(b)], resamples=4000)["pairs"]
    assert (
        c["inputs"] == 3
        and c["acr_a"] == pytest.approx(0.8 / 3)
        and c["acr_b"] == pytest.approx(1.2 / 3)
    )
    assert c["diff"] == pytest.approx(0.4 / 3)  # per input: +0.3, 0, +0.1
    assert (
        0.0 <= c["ci"][0] <= 0.04 and 0.19 <= c["ci"][1] <= 0.3 + 1e-12
    )  # resampled means of {0.3, 0, 0.1}
    assert [c["cert_acc_diff"][r] for r in (0.0, 0.25, 0.5, 0.75, 1.0)] == pytest.approx(
        [1 / 3, 0, 0, 1 / 3, 0]
    )
    assert records.compare([str(a), str(b)], resamples=4000)["pairs"][0] == c  # seeded
    assert records.read_tsv(str(b))[0]["time"] == pytest.approx(3.14)
    (same,) = records.compare([str(a), str(a)])["pairs"]
    assert same["diff"] == 0 and same["ci"] == (0.0, 0.0)
    write_tsv(tmp_path / "c.tsv", [(99, 1, 1, 0.5)])
    with pytest.raises(ValueError, match="share no inputs"):
        records.compare([str(a), str(tmp_path / "c.tsv")])
    write_tsv(tmp_path / "d.tsv", [(0, 4, 4, 0.5)])
    with pytest.raises(ValueError, match="disagree on the label of input 0"):
        records.compare([str(a), str(tmp_path / "d.tsv")])


def test_compare_over_seeds_with_a_two_level_bootstrap(tmp_path):
    """Three pairs: the mean of the per-pair differences, and an interval that resamples pairs,
    then inputs: wider than the inputs alone give when the pairs disagree, and exactly the spread of
    the pair means when every pair's inputs agree within it."""
    paths = []
    for j, shift in enumerate((0.0, 0.3, 0.6)):
        rows_a = [(i, 1, 1, 0.5) for i in range(40)]
        rows_b = [(i, 1, 1, 0.5 + shift) for i in range(40)]  # B - A = shift on every input
        for side, rows in (("a", rows_a), ("b", rows_b)):
            write_tsv(tmp_path / f"{side}{j}.tsv", rows)
            paths.append(str(tmp_path / f"{side}{j}.tsv"))
    c = records.compare(paths, resamples=4000)
    assert [p["diff"] for p in c["pairs"]] == pytest.approx([0.0, 0.3, 0.6])
    assert all(
        p["ci"] == pytest.approx((p["diff"], p["diff"])) for p in c["pairs"]
    )  # no spread within a pair
    assert c["diff"] == pytest.approx(0.3)
    assert c["ci"][0] == pytest.approx(0.0, abs=1e-9) and c["ci"][1] == pytest.approx(
        0.6, abs=1e-9
    )  # 3 seeds' extremes
    assert c["acr_b"]["mean"] == pytest.approx(0.8) and c["acr_b"]["sd"] == pytest.approx(0.3)
    text = records.format_comparison(c)
    assert "two-level" in text and "pair 3" in text


def test_the_bootstrap_draws_in_blocks_and_gives_the_same_means():
    d = np.random.default_rng(1).normal(size=500)
    whole = records.bootstrap_means(d, 300, np.random.default_rng(7))
    blocks = records.bootstrap_means(
        d, 300, np.random.default_rng(7), block=1000
    )  # 2 resamples per block
    np.testing.assert_array_equal(whole, blocks)
    t0 = time.time()
    big = records.bootstrap_means(np.ones(50_000), 200, np.random.default_rng(0))
    assert (big == 1).all() and time.time() - t0 < 60


def test_plot_draws_the_certified_accuracy_of_a_results_file(tmp_path):
    """--plot's figure: a PNG of the file's curve, written whole (a new file beside the TSV)."""
    pytest.importorskip("matplotlib")
    write_tsv(tmp_path / "a.tsv", [(0, 1, 1, 0.6), (1, 1, 0, 0.0)])
    records.plot_curve(str(tmp_path / "a.tsv"), "a", str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_table_title_is_never_cut():
    table = records.format_table(
        certify.summarize([dict(label=1, predict=1, radius=0.2)]), "fashion-mnist s=0.125"
    )
    assert "fashion-mnist s=0.125 " in table


# ================================================================ models and checkpoints
def test_lenet_and_resnet110_state_dicts_match_the_authors_release():
    lenet = models.get_model("mnist")
    assert {k: tuple(v.shape) for k, v in lenet.state_dict().items()} == {
        "conv1.weight": (20, 1, 5, 5),
        "conv1.bias": (20,),
        "conv2.weight": (50, 20, 5, 5),
        "conv2.bias": (50,),
        "fc1.weight": (500, 800),
        "fc1.bias": (500,),
        "fc2.weight": (10, 500),
        "fc2.bias": (10,),
    }
    bn = lambda p, c: {
        f"{p}.weight": (c,),
        f"{p}.bias": (c,),
        f"{p}.running_mean": (c,),
        f"{p}.running_var": (c,),
        f"{p}.num_batches_tracked": (),
    }
    want = {"conv1.weight": (16, 3, 3, 3), **bn("bn1", 16), "fc.weight": (10, 64), "fc.bias": (10,)}
    c_in = 16
    for s, c in enumerate([16, 32, 64], start=1):
        for i in range(18):
            p = f"layer{s}.{i}"
            want.update(
                {
                    f"{p}.conv1.weight": (c, c_in if i == 0 else c, 3, 3),
                    **bn(f"{p}.bn1", c),
                    f"{p}.conv2.weight": (c, c, 3, 3),
                    **bn(f"{p}.bn2", c),
                }
            )
            if i == 0 and c != c_in:
                want.update(
                    {f"{p}.downsample.0.weight": (c, c_in, 1, 1), **bn(f"{p}.downsample.1", c)}
                )
        c_in = c
    got = {k: tuple(v.shape) for k, v in models.get_model("cifar10").state_dict().items()}
    assert got == want


def test_foreign_checkpoints_load_strictly(tmp_path):
    ref = models.get_model("cifar10", arch="resnet20")
    sd = ref.state_dict()
    torch.save({"net": sd, "epoch": 3}, tmp_path / "authors.pth")  # the MACER authors' format
    torch.save(
        {"arch": "cifar_resnet20", "state_dict": {"1.module." + k: v for k, v in sd.items()}},
        tmp_path / "cohen.pth.tar",
    )  # Cohen et al.'s: Sequential(normalize, DataParallel(net))
    m, cfg = models.load_checkpoint(
        str(tmp_path / "authors.pth"), dataset="cifar10", arch="resnet20"
    )
    assert cfg["normalize"] is False and isinstance(m.normalize, nn.Identity)
    m2, cfg2 = models.load_checkpoint(str(tmp_path / "cohen.pth.tar"))
    assert cfg2["dataset"] == "cifar10" and cfg2["arch"] == "resnet20" and cfg2["normalize"] is True
    x = torch.rand(2, 3, 32, 32)
    ref.eval(), m.eval(), m2.eval()
    facts = data.DATASETS["cifar10"]
    # m has no normalisation layer (the MACER authors' networks take [0, 1] input): fed ref's
    # normalised input, it computes what ref computes on x.
    torch.testing.assert_close(m(models.Normalize(facts.mean, facts.std)(x)), ref(x))
    torch.testing.assert_close(m2(x), ref(x))
    with pytest.raises(ValueError, match="does not fit"):  # a library error, not an exit
        models.load_checkpoint(str(tmp_path / "authors.pth"), dataset="cifar10", arch="resnet56")


@pytest.mark.parametrize("dataset", list(data.DATASETS))
def test_forward_shapes_and_normalisation_inside_the_model(dataset):
    torch.manual_seed(0)
    facts = data.DATASETS[dataset]
    net = models.get_model(dataset).eval()
    x = torch.rand(2, *facts.shape)
    with torch.no_grad():
        out = net(x)
        raw = models.get_model(dataset, normalize=False).eval()
        raw.load_state_dict(net.state_dict())  # normalisation adds no state-dict entries
        want = raw(
            (x - torch.tensor(facts.mean).view(1, -1, 1, 1))
            / torch.tensor(facts.std).view(1, -1, 1, 1)
        )
    assert out.shape == (2, facts.classes)
    torch.testing.assert_close(out, want)


def test_the_default_precision_is_fixed_per_device_and_the_probe_only_advises(monkeypatch):
    """The same command gives the same classifier whatever the load: on a CPU, a run that names
    no precision takes fp32 whatever the probe measures (the ratios below are those that one
    AMD EPYC measured within an hour under varying load, 0.22x to 7.98x), and prints a hint only
    where bf16 measured 1.2x faster or more. The real probe, with a second process keeping the
    other core busy, does not change it either. measure_precision leaves the model it probes as
    it was: weights, BatchNorm statistics, no grads."""
    model = models.get_model("cifar10", arch="resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg, cpu = train.recipe("cifar10", 0.25, "macer"), torch.device("cpu")
    for ratio in (2.29, 0.88, 0.84, 7.98, 0.22, 1.62, 1.1):
        lines = []
        monkeypatch.setattr(models, "measure_precision", lambda *a, ratio=ratio: ratio)
        log = lambda line, **k: lines.append(line)  # noqa: B023
        got = models.pick_precision(cfg, None, 1000, model, cpu, (4, 3, 32, 32), True, log)
        assert got == "fp32" and bool(lines) == (ratio >= 1.2)
        assert all(f"bf16 measured {ratio:.2f}x faster than fp32" in line for line in lines)
    monkeypatch.undo()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for train_step in (True, False):
            args = (cfg, None, 1000, model, cpu, (4, 3, 32, 32), train_step, QUIET)
            assert models.pick_precision(*args) == "fp32"
    finally:
        busy.kill()
    assert models.measure_precision(model, cpu, torch.rand(4, 3, 32, 32), True, 0.01) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert "threads)" in models.device_name("cpu")
    name = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    assert name in models.device_name("cpu")


def test_training_precision_follows_the_flags_then_the_record_then_the_device(monkeypatch):
    """--bf16/--fp32 force; a resume trains on in the precision the checkpoint last trained in
    (and its record keeps each epoch's); else the device's default."""
    cfg = train.recipe("fashion-mnist", 0.25, "macer")
    monkeypatch.setattr(models, "measure_precision", lambda *a, **k: 3.0)
    lenet, cpu = models.get_model("fashion-mnist"), torch.device("cpu")

    def pick(cfg, ckpt, steps):
        saved = (train.epoch_precisions(ckpt) or [None])[-1]
        return models.pick_precision(cfg, saved, steps, lenet, cpu, (8, 1, 28, 28), True, QUIET)

    assert pick(cfg, None, 1000) == "fp32" and pick(cfg, None, 49) == "fp32"
    assert pick(dataclasses.replace(cfg, bf16=True), None, 1000) == "bf16"
    old = dict(epoch=3, config=dict(precision="fp32"))  # a checkpoint that recorded one precision
    assert pick(cfg, old, 1000) == "fp32" and train.epoch_precisions(old) == ["fp32"] * 3
    assert pick(cfg, dict(old, precisions=["fp32", "bf16", "bf16"]), 1000) == "bf16"
    assert (
        train.describe_precisions(["bf16"] * 5 + ["fp32"] * 5)
        == "bf16 in epochs 1-5, fp32 in epochs 6-10"
    )
    assert train.describe_precisions(["fp32"] * 3) == "fp32"


def test_checkpoint_loading_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"model": Evil(), "config": {}}, tmp_path / "evil.pt")
    one_line_error(certify.main, [str(tmp_path / "evil.pt")])
    assert not (tmp_path / "pwned").exists()


# ================================================================ data
def test_crop_flip_is_a_padded_window_per_image():
    """data.crop_flip against a naive search: each output is one of the 9 x 9 zero-padded
    windows of its input, flipped or not, and all offsets and both flips occur."""
    torch.manual_seed(0)
    x = torch.rand(200, 3, 8, 8)
    out = data.crop_flip(x)
    x_pad = F.pad(x, (4, 4, 4, 4))
    seen = set()
    for i in range(len(x)):
        matches = [
            (di, dj, f)
            for di in range(9)
            for dj in range(9)
            for f in (0, 1)
            if torch.equal(
                out[i], (lambda w: w.flip(2) if f else w)(x_pad[i, :, di : di + 8, dj : dj + 8])
            )
        ]
        assert matches, f"image {i} is no padded window of its input"
        seen.update(matches)
    assert {f for _, _, f in seen} == {0, 1} and len({(di, dj) for di, dj, _ in seen}) > 60


def test_every_rank_takes_the_same_number_of_steps():
    """257 images on 2 ranks: 128 each (DDP's all-reduce hangs when one rank takes a step more),
    disjoint, from one shuffle."""
    images = data.TensorImages(torch.zeros(257, 1, 2, 2, dtype=torch.uint8), torch.arange(257))
    shards = [
        [y for _, y in data.batches(images, 64, 0, 0, False, "cpu", rank, 2)] for rank in (0, 1)
    ]
    assert [len(s) for s in shards] == [2, 2]
    seen = [torch.cat(s) for s in shards]
    assert len(seen[0]) == len(seen[1]) == 128 and not set(seen[0].tolist()) & set(seen[1].tolist())


def write_idx(path, array, dtype_code=0x08):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, dtype_code, array.ndim) + struct.pack(
        ">" + "I" * array.ndim, *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_bars(raw, sizes=(("train", 512), ("t10k", 100)), classes=10, seed=0):
    """A learnable dataset in the IDX layout: class c is a bright bar in row band c."""
    rng = np.random.default_rng(seed)
    for prefix, N in sizes:
        y = rng.integers(0, classes, N)
        x = rng.integers(0, 60, (N, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", y)


def test_bad_idx_files_are_named(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_bars(raw, (("train", 20), ("t10k", 10)))
    assert len(data.load_dataset("fashion-mnist", str(tmp_path), train=True)) == 20
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.full(10, 12))  # labels out of range
    with pytest.raises(ValueError, match="labels outside"):
        data.load_dataset("fashion-mnist", str(tmp_path), train=False)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.zeros(9))  # one label short
    with pytest.raises(ValueError, match="10 images .* and 9 labels"):
        data.load_dataset("fashion-mnist", str(tmp_path), train=False)
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x03" + struct.pack(">III", 10, 28, 28) + b"\0" * 100)  # cut short
    with pytest.raises(ValueError, match="t10k-images.*not a complete"):
        data.load_dataset("fashion-mnist", str(tmp_path), train=False)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.zeros(10))
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="t10k-images.*not a complete gzip file"):
        data.load_dataset("fashion-mnist", str(tmp_path), train=False)
    write_bars(raw, (("t10k", 10),))
    whole = (raw / "t10k-images-idx3-ubyte.gz").read_bytes()
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(
        whole[: len(whole) // 2]
    )  # a download cut short
    with pytest.raises(ValueError, match="t10k-images.*not a complete gzip file"):
        data.load_dataset("fashion-mnist", str(tmp_path), train=False)
    os.remove(raw / "t10k-images-idx3-ubyte.gz")  # the test set missing where the training set is
    with pytest.raises(ValueError, match="lacks t10k-images"):
        data.load_dataset("fashion-mnist", str(tmp_path), train=False)


# ================================================================ train.py and certify.py end to
# end
@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "FashionMNIST" / "raw").mkdir(parents=True)
    write_bars(root / "FashionMNIST" / "raw")
    return str(root)


def run(*args, env=None, ok=True):
    p = subprocess.run(
        [sys.executable, *args],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    return p.stdout + p.stderr


@pytest.mark.parametrize("device", DEVICES)
def test_train_then_certify_end_to_end(tiny_fmnist, tmp_path, device):
    """Train, certify at the end, resume with more epochs (certify.tsv is redone for the new
    checkpoint), then certify.py with Soft-RS; on each device, in its default precision (on CUDA
    bf16 autocast, where the GPU has it), channels_last."""
    out = tmp_path / "run"
    precision = models.default_precision(torch.device(device))
    common = (
        "train.py",
        "--device",
        device,
        "--data-dir",
        tiny_fmnist,
        "--out-dir",
        str(out),
        "--train-subset",
        "0",
        "--k",
        "4",
        "--lr",
        "0.05",
        "--cert-n",
        "200",
        "--cert-skip",
        "10",
        "--cert-max",
        "5",
    )
    log = run(*common, "--epochs", "1")
    assert f"{device} {precision}" in log and "over 5 inputs" in log
    first = records.read_tsv(str(out / "certify.tsv"))
    log = run(*common, "--epochs", "2", "--resume")
    assert "resumed" in log and "afresh" in log and "over 5 inputs" in log
    assert records.read_tsv(str(out / "certify.tsv")) != first
    log = run(
        "certify.py",
        str(out / "checkpoint.pt"),
        "--data-dir",
        tiny_fmnist,
        "--n",
        "300",
        "--skip",
        "20",
        "--out",
        str(tmp_path / "c.tsv"),
        "--bound",
        "bernstein",
        "--device",
        device,
    )
    rows = records.read_tsv(str(tmp_path / "c.tsv"))
    assert [r["idx"] for r in rows] == [0, 20, 40, 60, 80] and "ACR" in log and "ETA" in log
    assert (
        sum(r["correct"] for r in rows) >= 2
    )  # chance is 0.5 of 5: the smoothed classifier learnt the bars
    assert f"{precision}, 1 process(es) ->" in log
    record = records.read_settings(str(tmp_path / "c.tsv"))
    assert record == {**record, **dict(dataset="fashion-mnist", sigma=0.25, n0=100, n=300)}
    assert record["bound"] == "bernstein" and record["precision"] == precision
    assert record["noise_device"] == device


@pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_end_to_end_on_real_fashion_mnist(tmp_path):
    log = run(
        "train.py",
        "--data-dir",
        str(tmp_path / "none"),
        "--out-dir",
        str(tmp_path),
        "--method",
        "cohen",
        "--epochs",
        "1",
        "--train-subset",
        "4000",
        "--cert-n",
        "500",
        "--cert-max",
        "20",
        "--cert-skip",
        "50",
    )
    s = records.read_tsv(str(tmp_path / "certify.tsv"))
    assert len(s) == 20 and sum(r["correct"] for r in s) >= 8, log  # chance is 2 of 20


@pytest.mark.parametrize("device", DEVICES)
def test_resume_continues_exactly_and_keeps_the_saved_settings(tiny_fmnist, tmp_path, device):
    """An interrupted run resumed from its checkpoint (in a moved folder) ends with the weights of
    the run that was not interrupted: bit for bit on the CPU; on CUDA to 1e-5, since cuDNN's
    convolution gradients add in an order that varies from run to run."""
    common = [
        "--device",
        device,
        "--data-dir",
        tiny_fmnist,
        "--k",
        "2",
        "--cert-max",
        "0",
        "--save-every",
        "1",
        "--train-subset",
        "192",
        "--milestones",
        "1",
        "--lr",
        "0.02",
    ]
    train.main(common + ["--epochs", "2", "--out-dir", str(tmp_path / "straight")])
    train.main(common + ["--epochs", "1", "--out-dir", str(tmp_path / "split")])
    os.rename(tmp_path / "split", tmp_path / "moved")  # a run folder moved or copied elsewhere
    train.main(
        [
            "--epochs",
            "2",
            "--out-dir",
            str(tmp_path / "moved"),
            "--resume",
            "--data-dir",
            tiny_fmnist,
            "--device",
            device,
        ]
    )
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "moved" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and b["config"]["out_dir"] == str(tmp_path / "moved")
    assert (
        b["config"]["lr"] == 0.02 and b["config"]["k"] == 2
    )  # the saved settings, not the recipe's
    for name, v in a["model"].items():
        if device == "cpu":
            assert torch.equal(v, b["model"][name]), name
        else:
            torch.testing.assert_close(v, b["model"][name], rtol=1e-5, atol=1e-5)
    train.main(
        ["--out-dir", str(tmp_path / "moved"), "--resume", "--data-dir", tiny_fmnist]
        + ["--device", device]
    )  # no --epochs: still 2
    assert torch.load(tmp_path / "moved" / "checkpoint.pt", weights_only=True)["epoch"] == 2


def torchrun(*args, ok=True):
    """The README's launch: torchrun --standalone --nproc_per_node 2 -- SCRIPT ARGS."""
    return run(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--", *args, ok=ok
    )


TWO_GPUS = pytest.param(
    "cuda",
    marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs here"),
)


@pytest.mark.parametrize("device", ["cpu", TWO_GPUS])
def test_ddp_training_and_its_final_certification_use_both_processes(tiny_fmnist, tmp_path, device):
    """torchrun with two processes: gloo on the CPU, NCCL on two GPUs."""
    log = torchrun(
        "train.py",
        "--device",
        device,
        "--data-dir",
        tiny_fmnist,
        "--out-dir",
        str(tmp_path),
        "--epochs",
        "1",
        "--k",
        "2",
        "--train-subset",
        "257",
        "--cert-max",
        "4",
        "--cert-n",
        "100",
        "--cert-skip",
        "10",
    )
    assert (
        "2 process(es) ->" in log
        and "over 4 inputs" in log
        and "rank 1: [" in log
        and "rank 0: [" in log
    )
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0][0], ckpt["rng"][1][0])
    assert len(records.read_tsv(str(tmp_path / "certify.tsv"))) == 4


def test_torchrun_certification_gives_the_rows_of_one_process(tiny_fmnist, lenet_ckpt, tmp_path):
    """The README's command, two gloo processes on the CPU: the same rows (predict and radius) as
    one process with the same seed, each written once; a rerun resumes and certifies nothing."""
    args = [
        lenet_ckpt,
        "--data-dir",
        tiny_fmnist,
        "--n",
        "300",
        "--skip",
        "9",
        "--max",
        "7",
        "--seed",
        "3",
    ]
    run("certify.py", *args, "--out", str(tmp_path / "one.tsv"))
    log = torchrun("certify.py", *args, "--out", str(tmp_path / "two.tsv"))
    assert "2 process(es)" in log and log.count("certified accuracy at radius r") == 1
    rows = lambda name: sorted(
        (r["idx"], r["predict"], r["radius"]) for r in records.read_tsv(str(tmp_path / name))
    )
    assert rows("one.tsv") == rows("two.tsv") and len(rows("two.tsv")) == 7
    log = torchrun("certify.py", *args, "--out", str(tmp_path / "two.tsv"))
    assert "7 inputs done, 0 to go" in log and rows("two.tsv") == rows("one.tsv")


def write_setting(dataset, root, val_images=8):
    """A few images of `dataset` in its real on-disk format; class c is brighter in channel band
    c."""
    rng = np.random.default_rng(0)
    root.mkdir()

    def images(N, shape):
        y = rng.integers(0, 2, N)
        x = rng.integers(0, 100, (N, *shape)).astype(np.uint8)
        x[y == 1] += 100
        return x, y

    if dataset == "mnist":
        (root / "MNIST" / "raw").mkdir(parents=True)
        write_bars(root / "MNIST" / "raw", (("train", 64), ("t10k", 8)))
    elif dataset == "cifar10":
        (root / "cifar-10-batches-py").mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            x, y = images(16, (3, 32, 32))
            batch = {"data": x.reshape(16, -1), "labels": y.tolist()}  # (N, 3, 32, 32) -> (N, 3072)
            (root / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(batch))
        meta = {"label_names": [str(c) for c in range(10)]}
        (root / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps(meta))
    elif dataset == "svhn":
        import scipy.io

        for split in ("train", "test"):
            x, y = images(32, (32, 32, 3))
            scipy.io.savemat(
                root / f"{split}_32x32.mat",
                {"X": x.transpose(1, 2, 3, 0), "y": (y + 9)[:, None] % 10 + 1},
            )
    else:
        from PIL import Image

        for split, N in (("train", 8), ("val", val_images)):
            x, y = images(N, (64, 64, 3))
            for i, (img, c) in enumerate(zip(x, y, strict=True)):
                (root / split / f"n0{c}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / split / f"n0{c}" / f"{i:03d}.JPEG")


def test_cifar10_and_svhn_files_that_fail_their_md5_are_refused_in_one_sentence(
    tmp_path, monkeypatch
):
    """torchvision checks the official MD5 sums: files in the right format but not the official
    ones (here the synthetic ones), with no download possible, end in one sentence."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no download
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    for dataset in ("cifar10", "svhn"):
        write_setting(dataset, tmp_path / dataset)
        with pytest.raises(ValueError, match=f"{dataset} is missing from .* or corrupt"):
            data.load_dataset(dataset, str(tmp_path / dataset), train=False)


@pytest.mark.parametrize("device", DEVICES)
def test_imagenet_honours_train_subset_and_augment(tmp_path, device):
    """--train-subset takes the first N ImageNet images and --augment 0 the evaluation transform
    (resize and centre crop), as they do for the small datasets, instead of being recorded only.
    On CUDA the loader pins its batches and data.batches copies them without blocking."""
    write_setting("imagenet", tmp_path / "data")
    base = dict(dataset="imagenet", data_dir=str(tmp_path / "data"), batch=2, workers=0)
    for subset, augment in ((3, True), (0, False)):
        cfg = dataclasses.replace(train.Config(), **base, train_subset=subset, augment=augment)
        loader, _ = train.load_train_set(cfg, torch.device(device), ddp=False)
        assert len(loader.dataset) == (subset or 8) and loader.pin_memory == (device == "cuda")
        x, y = next(data.batches(loader, 2, 0, 0, augment, torch.device(device)))
        assert x.device.type == y.device.type == device and x.shape == (2, 3, 224, 224)
        tf = loader.dataset.dataset.transform
        names = [type(t).__name__ for t in tf.transforms]
        assert ("RandomResizedCrop" in names) == augment and ("CenterCrop" in names) != augment


@pytest.mark.parametrize(
    "dataset, arch",
    [("mnist", "lenet"), ("cifar10", "resnet20"), ("svhn", "resnet20"), ("imagenet", "resnet50")],
)
def test_the_four_paper_settings_end_to_end(dataset, arch, tmp_path, monkeypatch):
    """Each setting's reader on files in its real format, a few MACER steps, a checkpoint, and
    certify.py on two test images; for ImageNet, the protocol's own choice: every 100th image.
    torchvision checks CIFAR-10's and SVHN's files against the official MD5 sums, which these
    synthetic files cannot match: here that check asks only that the file exists."""
    import torchvision.datasets

    exists = lambda path, md5=None: os.path.isfile(path)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", exists)
    root = tmp_path / "data"
    write_setting(dataset, root, val_images=201)
    out = tmp_path / "run"
    train.main(
        [
            "--dataset",
            dataset,
            "--arch",
            arch,
            "--data-dir",
            str(root),
            "--out-dir",
            str(out),
            "--epochs",
            "1",
            "--k",
            "2",
            "--batch",
            "4" if dataset == "imagenet" else "16",
            "--train-subset",
            "8" if dataset == "imagenet" else "32",
            "--workers",
            "1",
            "--cert-max",
            "0",
        ]
    )
    tsv = tmp_path / "c.tsv"
    which = [] if dataset == "imagenet" else ["--skip", "3", "--max", "2"]
    certify.main(
        [
            str(out / "checkpoint.pt"),
            "--data-dir",
            str(root),
            "--n0",
            "4",
            "--n",
            "16",
            "--batch",
            "8",
            "--out",
            str(tsv),
            *which,
        ]
    )
    rows = records.read_tsv(str(tsv))
    want = [0, 100, 200] if dataset == "imagenet" else [0, 3]
    assert [r["idx"] for r in rows] == want and all(
        0 <= r["label"] < data.DATASETS[dataset].classes for r in rows
    )


def test_start_skip_and_max_choose_the_test_images(lenet_ckpt, tiny_fmnist, tmp_path):
    """The MACER authors' evaluation, images 500-999, is --start 500 --skip 1 --max 500; here
    5-7."""
    certify.main(
        [
            lenet_ckpt,
            "--data-dir",
            tiny_fmnist,
            "--n",
            "50",
            "--start",
            "5",
            "--skip",
            "1",
            "--max",
            "3",
            "--out",
            str(tmp_path / "s.tsv"),
        ]
    )
    assert [r["idx"] for r in records.read_tsv(str(tmp_path / "s.tsv"))] == [5, 6, 7]


# ================================================================ user mistakes: one sentence, no
# traceback
@pytest.fixture(scope="module")
def lenet_ckpt(tiny_fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    train.main(
        [
            "--data-dir",
            tiny_fmnist,
            "--out-dir",
            str(out),
            "--epochs",
            "1",
            "--k",
            "1",
            "--train-subset",
            "64",
            "--cert-max",
            "0",
        ]
    )
    return str(out / "checkpoint.pt")


def one_line_error(fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    msg = str(e.value.code)
    assert e.value.code not in (0, None) and msg.startswith("error:") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--dataset", "cifar100"], "unknown dataset"),
        (["--sigma", "0"], "--sigma"),
        (["--sigma", "nan"], "--sigma"),
        (["--k", "0"], "--k"),
        (["--lbd", "-1"], "--lbd"),
        (["--lbd", "inf"], "--lbd"),
        (["--gamma", "nan"], "--gamma"),
        (["--beta", "0"], "--beta"),
        (["--beta", "inf"], "--beta"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--momentum", "inf"], "--momentum"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--grad-clip", "nan"], "--grad-clip"),
        (["--train-subset", "-5"], "--train-subset"),
        (["--cert-alpha", "1"], "--cert-alpha"),
        (["--cert-n", "0"], "--cert-n"),
        (["--cert-n0", "0"], "--cert-n0"),
        (["--arch", "resnet110"], "does not fit"),
        (["--seed", str(2**70)], "--seed"),
        (["--fp32", "--bf16"], "contradict"),
        (["--method", "cohen", "--lbd", "16"], "--method cohen is k = 1 and lambda = 0"),
        (["--method", "cohen", "--k", "4"], "--method cohen is k = 1 and lambda = 0"),
        (["--milestones", "3", "1"], "--milestones must be increasing"),
        (["--dynamic-lbd", "1", "--milestones"], "--dynamic-lbd 1 waits"),
        (["--resume", "--overwrite"], "give one of them"),
        (["--cert-n", "5"], "no input can be certified with --cert-n 5"),
        (["--device", "foo"], "unknown device"),
        (
            ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
            "no CUDA device",
        ),
    ],
)
def test_train_rejects_bad_flags(flags, words):
    assert words in one_line_error(train.main, flags)


def test_a_resume_keeps_certify_tsv_and_refuses_another_world_size(tiny_fmnist, tmp_path):
    """--resume with other --cert-* flags keeps the rows of the unchanged checkpoint and says what
    to do; a checkpoint of 2 processes is not resumed by 1 (the batches, shards and noise would
    differ from an uninterrupted run)."""
    out = tmp_path / "run"
    common = ["--data-dir", tiny_fmnist, "--out-dir", str(out), "--k", "1", "--epochs", "1"]
    common += ["--train-subset", "64", "--cert-n", "100", "--cert-skip", "10", "--cert-max", "2"]
    train.main(common)
    rows = (out / "certify.tsv").read_text()
    msg = one_line_error(train.main, common + ["--resume", "--cert-n", "200"])
    assert "its rows were made with other settings (n)" in msg and "would train again" in msg
    assert (out / "certify.tsv").read_text() == rows
    train.main(common + ["--resume"])  # the same settings: nothing to add, nothing lost
    assert (out / "certify.tsv").read_text() == rows
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save(dict(ckpt, rng=ckpt["rng"] * 2), out / "checkpoint.pt")
    assert "trained by 2 process(es)" in one_line_error(train.main, common + ["--resume"])
    torch.save(dict(ckpt, rng=[]), out / "checkpoint.pt")
    assert "not a readable train.py checkpoint" in one_line_error(train.main, common + ["--resume"])
    torch.save(dict(ckpt, config=dict(ckpt["config"], sigma="0.25")), out / "checkpoint.pt")
    assert "did not write" in one_line_error(train.main, common + ["--resume"])


def test_train_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setitem(data.IDX, "fashion-mnist", ("FashionMNIST", str(tmp_path / "nowhere")))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no download, here or anywhere
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    msg = one_line_error(
        train.main, ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")]
    )
    assert (
        "not found" in msg
        and str(tmp_path) in msg
        and "apt-get install dataset-fashion-mnist" in msg
    )


def test_train_guards_the_run(tiny_fmnist, lenet_ckpt, tmp_path, monkeypatch):
    """An existing checkpoint is not overwritten without --overwrite; --resume refuses settings it
    cannot honour and fewer epochs than it has; an unwritable out-dir, a folder where the
    checkpoint goes, and another run holding the folder fail before training; a diverging run
    stops with a sentence and keeps its last good checkpoint; a full disk at the save is one
    line."""
    folder = os.path.dirname(lenet_ckpt)
    base = [
        "--data-dir",
        tiny_fmnist,
        "--out-dir",
        folder,
        "--k",
        "1",
        "--train-subset",
        "64",
        "--cert-max",
        "0",
    ]
    saved = Path(lenet_ckpt).read_bytes()
    assert "--overwrite" in one_line_error(train.main, base + ["--epochs", "1"])
    assert "cannot change --sigma" in one_line_error(
        train.main, base + ["--resume", "--sigma", "0.5"]
    )
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot write" in one_line_error(
        train.main, base[:2] + ["--out-dir", str(blocker / "sub"), "--epochs", "1"]
    )
    (tmp_path / "dir_ckpt" / "checkpoint.pt").mkdir(parents=True)
    assert "is a folder" in one_line_error(
        train.main, base[:2] + ["--out-dir", str(tmp_path / "dir_ckpt"), "--overwrite"]
    )
    held = train.lock_run_folder(str(tmp_path / "busy"))
    assert "another train.py is running" in one_line_error(
        train.main, base[:2] + ["--out-dir", str(tmp_path / "busy")]
    )
    os.close(held)
    good = torch.load(lenet_ckpt, weights_only=True)["model"]
    msg = one_line_error(
        train.main,
        base[:2]
        + [
            "--out-dir",
            str(tmp_path / "nan"),
            "--lr",
            "1e30",
            "--epochs",
            "1",
            "--train-subset",
            "256",
            "--k",
            "2",
        ],
    )
    assert "non-finite (epoch 1)" in msg and not (tmp_path / "nan" / "checkpoint.pt").exists()
    assert torch.equal(
        torch.load(lenet_ckpt, weights_only=True)["model"]["fc2.weight"], good["fc2.weight"]
    )
    assert Path(lenet_ckpt).read_bytes() == saved  # no refusal touched the run
    assert not os.path.exists(os.path.join(folder, "config.json"))  # the checkpoint is the record

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    msg = one_line_error(
        train.main,
        base[:2]
        + [
            "--out-dir",
            str(tmp_path / "full"),
            "--epochs",
            "1",
            "--k",
            "1",
            "--train-subset",
            "64",
            "--cert-max",
            "0",
        ],
    )
    assert "No space left on device" in msg and "--resume" in msg


def test_resume_refuses_fewer_epochs_and_another_architecture(tiny_fmnist, tmp_path):
    out = str(tmp_path / "two")
    common = [
        "--data-dir",
        tiny_fmnist,
        "--k",
        "1",
        "--train-subset",
        "64",
        "--cert-max",
        "0",
        "--out-dir",
        out,
    ]
    train.main(common + ["--epochs", "2"])
    saved = Path(os.path.join(out, "checkpoint.pt")).read_bytes()
    assert "trained 2 epochs" in one_line_error(train.main, common + ["--epochs", "1", "--resume"])
    assert Path(os.path.join(out, "checkpoint.pt")).read_bytes() == saved
    sd = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    sd["config"]["arch"] = "resnet20"
    sd["config"]["dataset"] = "cifar10"
    torch.save(sd, os.path.join(out, "checkpoint.pt"))
    assert "does not fit" in one_line_error(
        train.main, ["--out-dir", out, "--resume", "--data-dir", str(tmp_path)]
    )


def test_a_run_removes_no_file_it_did_not_make(tiny_fmnist, tmp_path):
    """train.py deletes nothing by a pattern: files that look like temporaries stay."""
    out = tmp_path / "run"
    out.mkdir()
    mine = ["notes.2.tmp", "thesis.2024-final.tmp", "checkpoint.pt.4242.tmp"]
    for name in mine:
        (out / name).write_text("not train.py's")
    flags = ["--data-dir", tiny_fmnist, "--out-dir", str(out), "--epochs", "1", "--k", "1"]
    train.main([*flags, "--train-subset", "64", "--cert-max", "0"])
    assert all((out / name).read_text() == "not train.py's" for name in mine)


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """atomic_write on a full disk (ENOSPC from the write, or from the flush to disk): the old
    file keeps its bytes, no temporary file is left, and the error reaches the caller. A symlink
    at the path is replaced by the new file; the file it pointed to is untouched."""
    path = tmp_path / "config.json"
    path.write_text("old")

    def full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        data.atomic_write(str(path), full)

    def full_on_flush(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_on_flush)
    with pytest.raises(OSError, match="No space"):
        data.atomic_write(str(path), "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["config.json"]
    other = tmp_path / "other.tsv"
    other.write_text("another run's rows")
    link = tmp_path / "link.tsv"
    link.symlink_to(other)
    data.atomic_write(str(link), "new")
    assert other.read_text() == "another run's rows" and not link.is_symlink()
    assert link.read_text() == "new"


def test_an_allocation_failure_names_the_flags_to_lower(tiny_fmnist, lenet_ckpt, tmp_path):
    msg = one_line_error(
        train.main,
        [
            "--data-dir",
            tiny_fmnist,
            "--out-dir",
            str(tmp_path / "big"),
            "--k",
            str(2**25),  # 2^31 noisy copies of 784 pixels a step
            "--train-subset",
            "64",
            "--epochs",
            "1",
            "--cert-max",
            "0",
        ],
    )
    assert "out of memory" in msg and "--batch" in msg and "--k" in msg
    msg = one_line_error(
        certify.main,
        [
            lenet_ckpt,
            "--data-dir",
            tiny_fmnist,
            "--out",
            str(tmp_path / "b.tsv"),
            "--max",
            "1",
            "--n",
            str(10**12),
            "--batch",
            str(10**12),
        ],
    )
    assert "out of memory" in msg and "--batch" in msg


def test_hand_edited_files_and_arguments_end_in_one_sentence(tmp_path):
    """Booleans are not numbers for Smooth; a settings record edited to {} or to another type, and
    a TSV in Latin-1, are named in a ValueError, not a traceback."""
    for bad in (dict(sigma=True), dict(beta=True), dict(num_classes=True)):
        with pytest.raises(ValueError):
            Smooth(Stub(), **{**dict(num_classes=2, sigma=0.25), **bad})
    with pytest.raises(ValueError, match="n0 must be an integer"):
        Smooth(Stub(), 2, 0.25).certify(torch.zeros(2), True, 100, 0.001, 10)
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    write_tsv(a, [(0, 1, 1, 0.1)])
    write_tsv(b, [(0, 1, 1, 0.1)])
    for record in ({}, dict(toy_settings(), n="100"), dict(toy_settings(), bound="wilson")):
        Path(records.settings_path(str(a))).write_text(json.dumps(record))
        with pytest.raises(ValueError, match="edited|lacks"):
            records.compare([str(a), str(b)])
    Path(b).write_bytes(Path(b).read_bytes().replace(b"idx", b"\xefdx"))
    with pytest.raises(ValueError, match="b.tsv is not a results file"):
        records.read_tsv(str(b))


def test_out_through_a_symlink_or_at_a_fifo_is_refused_and_touches_nothing(
    lenet_ckpt, tiny_fmnist, tmp_path
):
    """--out link.tsv --overwrite would truncate the file the link points to: refused, in one
    line, with that file and its record as they were; a FIFO is refused without blocking."""
    other = tmp_path / "other.tsv"
    other.write_text(records.HEADER + "\n0\t3\t3\t0.50000\t1\t1.0\n")
    (tmp_path / "link.tsv").symlink_to(other)
    base = [lenet_ckpt, "--data-dir", tiny_fmnist, "--n", "100", "--max", "1", "--overwrite"]
    assert "symbolic link" in one_line_error(
        certify.main, base + ["--out", str(tmp_path / "link.tsv")]
    )
    assert other.read_text().count("\n") == 2 and not (tmp_path / "link_settings.json").exists()
    os.mkfifo(tmp_path / "fifo.tsv")
    assert "not a regular file" in one_line_error(
        certify.main, base + ["--out", str(tmp_path / "fifo.tsv")]
    )


def test_the_record_hashes_the_bytes_that_were_loaded(lenet_ckpt, tmp_path, monkeypatch):
    """The checkpoint is read once: if train.py replaces the file after the load, the record still
    names the model that certified the rows."""
    path = tmp_path / "c.pt"
    path.write_bytes(Path(lenet_ckpt).read_bytes())
    real_load = torch.load

    def load_then_replace(f, **kw):
        state = real_load(f, **kw)
        path.write_bytes(b"the next epoch's checkpoint")
        return state

    monkeypatch.setattr(torch, "load", load_then_replace)
    _, cfg = models.load_checkpoint(str(path))
    with open(lenet_ckpt, "rb") as f:
        assert cfg["sha256"] == hashlib.sha256(f.read()).hexdigest()


def test_certify_rejects_bad_input(lenet_ckpt, tiny_fmnist, tmp_path, monkeypatch):
    base = [lenet_ckpt, "--data-dir", tiny_fmnist, "--out", str(tmp_path / "x.tsv")]
    for flags, words in [
        (["--alpha", "1.5"], "--alpha"),
        (["--alpha", "nan"], "--alpha"),
        (["--n", "0"], "--n0"),
        (["--n0", "0"], "--n0"),
        (["--dataset", "cifar10"], "--dataset cifar10 contradicts"),
        (["--arch", "resnet20"], "--arch resnet20 contradicts"),
        (["--no-normalize"], "--no-normalize contradicts"),
        (["--sigma", "nan"], "--sigma"),
        (["--beta", "-1"], "--beta"),
        (["--n", "1"], "no input can be certified"),
        (["--alpha", "1e-300", "--n", "100"], "no input can be certified"),
        (["--seed", str(2**70)], "--seed"),
        (["--device", "foo"], "unknown device"),
        (["--device", "cuda:99"], "no CUDA device"),
        (["--fp32", "--bf16"], "contradict"),
        (["--max", "0"], "--max"),  # zero is refused, never read as the default
        (["--skip", "0"], "--skip"),
        (["--batch", "0"], "--batch"),
        (["--start", "10000"], "--start 10000 is past the"),  # no image left to certify
    ]:
        assert words in one_line_error(certify.main, base + flags), flags
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: say so before certifying
    assert "--plot needs matplotlib" in one_line_error(certify.main, base + ["--plot"])
    assert not (tmp_path / "x.tsv").exists()
    sd = torch.load(lenet_ckpt, weights_only=True)
    sd["model"]["fc2.weight"], sd["model"]["fc2.bias"] = (
        torch.zeros(5, 500),
        torch.zeros(5),
    )  # 5 classes
    torch.save(sd, tmp_path / "k5.pt")
    assert "does not fit" in one_line_error(certify.main, [str(tmp_path / "k5.pt")] + base[1:])
    torch.save(dict(sd, config=[1, 2]), tmp_path / "listcfg.pt")
    assert "not a dict" in one_line_error(certify.main, [str(tmp_path / "listcfg.pt")] + base[1:])
    (tmp_path / "corrupt.pt").write_bytes(Path(lenet_ckpt).read_bytes()[:5000])
    assert "not a readable" in one_line_error(
        certify.main, [str(tmp_path / "corrupt.pt")] + base[1:]
    )
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a readable" in one_line_error(
        certify.main, [str(tmp_path / "notes.txt")] + base[1:]
    )
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "no state dict" in one_line_error(certify.main, [str(tmp_path / "list.pt")] + base[1:])
    assert "no checkpoint" in one_line_error(certify.main, [str(tmp_path / "absent.pt")] + base[1:])
    assert "--out must be a file name ending in .tsv" in one_line_error(
        certify.main, base[:3] + ["--out", str(tmp_path)]
    )
    certify.main(
        base[:3] + ["--out", str(tmp_path / "new" / "deep" / "x.tsv"), "--n", "50", "--max", "1"]
    )
    write_tsv(tmp_path / "a.tsv", [(0, 1, 1, 0.5)])
    write_tsv(tmp_path / "b.tsv", [(1, 1, 1, 0.5)])
    for files, words in [
        ((tmp_path / "a.tsv", tmp_path / "b.tsv"), "share no inputs"),
        ((tmp_path / "a.tsv", tmp_path / "gone.tsv"), "no results file"),
        ((tmp_path / "a.tsv", tmp_path), "is a folder"),
        ((tmp_path / "a.tsv",), "pairs"),
    ]:
        assert words in one_line_error(certify.main, ["--compare", *map(str, files)])


def test_certify_records_every_fact_a_row_depends_on(lenet_ckpt, tiny_fmnist, tmp_path):
    """The settings record refuses rows made with another sigma, alpha, normalisation, dataset or
    test set (another --data-dir), each in one line naming it; --overwrite starts afresh. The
    checkpoint here is a bare state dict, which records none of these: the flags fill them in."""
    other = tmp_path / "other"
    (other / "FashionMNIST" / "raw").mkdir(parents=True)
    write_bars(other / "FashionMNIST" / "raw", seed=1)  # the same format, other images
    mnist = tmp_path / "mnist"
    (mnist / "MNIST" / "raw").mkdir(parents=True)
    write_bars(mnist / "MNIST" / "raw", seed=2)
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(lenet_ckpt, weights_only=True)["model"], bare)
    base = [str(bare), "--data-dir", tiny_fmnist, "--out", str(tmp_path / "s.tsv"), "--n", "50"]
    base += ["--n0", "10", "--skip", "30", "--max", "2", "--sigma", "0.25"]
    certify.main(base + ["--dataset", "fashion-mnist"])
    for flags, key in [
        (["--dataset", "fashion-mnist", "--sigma", "0.5"], "sigma"),
        (["--dataset", "fashion-mnist", "--alpha", "0.4"], "alpha"),
        (["--dataset", "fashion-mnist", "--no-normalize"], "normalize"),
        (["--dataset", "fashion-mnist", "--data-dir", str(other)], "test_set_sha256"),
        (["--dataset", "mnist", "--data-dir", str(mnist)], "dataset, test_set_sha256"),
    ]:
        assert f"other settings ({key})" in one_line_error(certify.main, base + flags)
    certify.main(base + ["--dataset", "fashion-mnist", "--sigma", "0.5", "--overwrite"])
    assert len(records.read_tsv(str(tmp_path / "s.tsv"))) == 2


def test_a_full_disk_while_certifying_is_one_line_and_the_rows_so_far_stay(
    lenet_ckpt, tiny_fmnist, tmp_path, monkeypatch
):
    out = tmp_path / "full.tsv"
    base = [
        lenet_ckpt,
        "--data-dir",
        tiny_fmnist,
        "--out",
        str(out),
        "--n",
        "50",
        "--skip",
        "10",
        "--max",
        "4",
    ]
    written = []

    def fills_up(fd, line):
        if len(written) == 3:  # the header and two rows fit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(line)
        os.write(fd, line.encode())

    monkeypatch.setattr(records, "append_line", fills_up)
    assert "No space left on device" in one_line_error(certify.main, base)
    assert [r["idx"] for r in records.read_tsv(str(out))] == [0, 10]
    monkeypatch.undo()
    certify.main(base)  # room again: the rerun certifies the two that are missing
    assert [r["idx"] for r in records.read_tsv(str(out))] == [0, 10, 20, 30]


def test_a_closed_pipe_ends_compare_quietly(tmp_path):
    write_tsv(tmp_path / "a.tsv", [(i, 1, 1, 0.5) for i in range(20)])
    p = subprocess.Popen(
        [
            sys.executable,
            "certify.py",
            "--compare",
            str(tmp_path / "a.tsv"),
            str(tmp_path / "a.tsv"),
        ],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdout.close()  # as `| head -0` would, before anything is written
    err = p.stderr.read()
    assert p.wait() != 0 and "Traceback" not in err and "BrokenPipe" not in err, err


# ================================================================ the evidence
def test_every_readme_table_is_what_the_committed_files_give():
    """results/tables.py --check recomputes each marked table of README.md and results/README.md
    from the committed results files, records and bench JSON; a table edited by hand is found."""
    p = subprocess.run(
        [sys.executable, os.path.join("results", "tables.py"), "--check"],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    sys.path.insert(0, os.path.join(HERE, "results"))
    import tables

    readme = Path(HERE, "README.md").read_text()
    start = readme.index("<!-- table:readme-e10 -->")
    edited = readme[:start] + readme[start:].replace("0.", "9.", 1)
    current = tables.all_tables()[0]
    assert (
        edited != readme and tables.fill(edited, current) == tables.fill(readme, current) == readme
    )


# ========================================================== the worked example (results/toy.py)
def test_the_toy_grid_sum_is_the_smoothed_probability_and_its_run_certifies():
    """toy.smoothed_probability, which draws g's regions, against the closed form of a half-plane
    f = 1[x_1 > 0.3]: p_1 = Phi((x_1 - 0.3) / sigma), within the grid sum's error at a straight
    edge, half a grid step times the largest density, h / (2 sigma sqrt(2 pi)). And a short run of
    the toy's training and certification (as results/toy.py draws them) certifies its test points.
    """
    sys.path.insert(0, os.path.join(HERE, "results"))
    import toy

    half_plane = nn.Linear(2, 2)
    with torch.no_grad():
        half_plane.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
        half_plane.bias.copy_(torch.tensor([0.0, -0.3]))
    xs, ys = torch.linspace(-1, 1, 201), torch.linspace(-0.5, 0.5, 101)
    p = toy.smoothed_probability(half_plane, xs, ys)
    want = torch.tensor(norm.cdf((xs.numpy() - 0.3) / toy.SIGMA), dtype=torch.float32)
    h = float(xs[1] - xs[0])
    atol = h / (2 * toy.SIGMA * math.sqrt(2 * math.pi)) + 1e-5
    torch.testing.assert_close(p, want.expand(len(ys), -1), atol=atol, rtol=0)
    g = torch.Generator().manual_seed(0)
    x, y = toy.two_moons(200, 0.15, g)
    net = toy.fit(**toy.METHODS["MACER"], x=x, y=y, epochs=3)
    predict, R = toy.certify_points(net, x[:4])
    assert predict.shape == R.shape == (4,) and (R >= 0).all()


# ================================================================ results you can trust, round 4
def e10_folder(root, name, ckpt, tsv_from=None):
    """A run folder as results/e10 keeps them: the checkpoint and, if given, a results file (with
    its settings record) copied in under the n = 100,000 name."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(Path(ckpt).read_bytes())
    if tsv_from is not None:
        tsv = folder / "checkpoint_clopper-pearson_n100000.tsv"
        tsv.write_bytes(Path(tsv_from).read_bytes())
        Path(records.settings_path(str(tsv))).write_bytes(
            Path(records.settings_path(str(tsv_from))).read_bytes()
        )
    return folder


def e10_checkpoint(lenet_ckpt, path, **change):
    """lenet_ckpt's weights under a record of the e10 recipe, finished (tables.py reads only
    finished e10 runs): the files that tables.py checks, without ten epochs of training."""
    sys.path.insert(0, os.path.join(HERE, "results"))
    import tables

    ckpt = torch.load(lenet_ckpt, weights_only=True)
    config = {
        **ckpt["config"],
        **tables.E10_RECIPE,
        "method": "cohen",
        "k": 1,
        "lbd": 0.0,
        **change,
    }
    torch.save(dict(ckpt, config=config, epoch=config["epochs"]), path)
    return str(path)


def test_tables_verify_each_file_against_its_run_and_its_table(
    lenet_ckpt, tiny_fmnist, tmp_path, monkeypatch
):
    """results/tables.py refuses, naming the file and the setting: a results file certified at
    n = 200 under the n = 100,000 name; a settings record that names another checkpoint than its
    folder's (a file copied from another run); one table whose rows hold other alphas; a run that
    is not a finished run of the e10 recipe; two runs of the same settings, where it would pick
    one; a README whose table markers do not pair up."""
    sys.path.insert(0, os.path.join(HERE, "results"))
    import tables

    ckpt = e10_checkpoint(lenet_ckpt, tmp_path / "e10.pt")
    base = [ckpt, "--data-dir", tiny_fmnist, "--skip", "50", "--max", "2", "--n0", "10"]
    small, other, loose = tmp_path / "n200.tsv", tmp_path / "n1e5.tsv", tmp_path / "alpha.tsv"
    certify.main(base + ["--n", "200", "--out", str(small)])
    certify.main(base + ["--n", "100000", "--out", str(other)])
    certify.main(base + ["--n", "200", "--alpha", "0.1", "--out", str(loose)])

    def refused(name, folders, words):
        root = tmp_path / name
        for folder, (checkpoint, tsv) in folders.items():
            e10_folder(root, folder, checkpoint, tsv)
        monkeypatch.setattr(tables, "E10", str(root))
        with pytest.raises(SystemExit, match=words):
            tables.find(tables.runs(), "cohen", 0.25)

    refused("n200", {"cohen_s0.25": (ckpt, small)}, "n 200")
    seed1 = e10_checkpoint(lenet_ckpt, tmp_path / "seed1.pt", seed=1)
    refused("foreign", {"cohen_s0.25": (seed1, other)}, "checkpoint_sha256")
    off = e10_checkpoint(lenet_ckpt, tmp_path / "off.pt", train_subset=3000)
    refused("off", {"cohen_s0.25": (off, None)}, "not a finished run of the e10 recipe")
    twice = {"cohen_s0.25": (ckpt, other), "cohen_s0.25-again": (ckpt, other)}
    refused("twice", twice, "the same run's settings")
    with pytest.raises(SystemExit, match="one table would mix alpha"):
        tables.consistent([str(small), str(loose)])
    with pytest.raises(SystemExit, match="do not pair up"):
        tables.fill("<!-- table:toy -->\nold\n<!-- table:sizes -->\nold\n<!-- /table -->\n", {})


def test_training_never_saves_non_finite_weights(tiny_fmnist, tmp_path):
    """A step at lr 3e38 without clipping makes the weights infinite after a finite loss: the run
    stops with a sentence naming the epoch, and no checkpoint keeps those weights."""
    out = tmp_path / "inf"
    flags = ["--data-dir", tiny_fmnist, "--out-dir", str(out), "--epochs", "1", "--k", "1"]
    flags += ["--train-subset", "64", "--cert-max", "0", "--lr", "3e38", "--grad-clip", "0"]
    assert "non-finite in epoch 1" in one_line_error(train.main, flags)
    assert not (out / "checkpoint.pt").exists()


def test_a_run_keeps_its_facts_in_its_checkpoint_alone(tiny_fmnist, lenet_ckpt, tmp_path):
    """No config.json beside the checkpoint: a user's file of that name in --out-dir stays as it
    was, and a run refused at once (--overwrite with a dataset that is not there) leaves the
    folder's checkpoint and that file untouched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("the user's own")
    flags = ["--data-dir", tiny_fmnist, "--out-dir", str(out), "--epochs", "1", "--k", "1"]
    train.main(flags + ["--train-subset", "64", "--cert-max", "0"])
    saved = (out / "checkpoint.pt").read_bytes()
    one_line_error(
        train.main, flags + ["--overwrite", "--dataset", "mnist", "--sigma", "0.5"]
    )  # no MNIST under --data-dir
    assert (out / "config.json").read_text() == "the user's own"
    assert (out / "checkpoint.pt").read_bytes() == saved
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["dataset"] == (
        "fashion-mnist"
    )


def test_the_training_set_is_fingerprinted_and_checked(tiny_fmnist, tmp_path):
    """--train-subset beyond the training set is refused (it would train on fewer and record
    more); the checkpoint records the training images' hash, and a resume on others is refused."""
    flags = ["--data-dir", tiny_fmnist, "--k", "1", "--cert-max", "0", "--save-every", "1"]
    msg = one_line_error(
        train.main, flags + ["--out-dir", str(tmp_path / "a"), "--train-subset", "30000"]
    )
    assert "--train-subset 30000 is more than the 512 training images" in msg
    out = str(tmp_path / "b")
    train.main(flags + ["--out-dir", out, "--train-subset", "64", "--epochs", "1"])
    record = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["config"]
    x = data.load_dataset("fashion-mnist", tiny_fmnist, train=True)
    assert record["train_set_sha256"] == data.fingerprint(x, 64) != data.fingerprint(x, 63)
    other = tmp_path / "other"
    (other / "FashionMNIST" / "raw").mkdir(parents=True)
    write_bars(other / "FashionMNIST" / "raw", seed=5)
    msg = one_line_error(
        train.main, ["--out-dir", out, "--resume", "--epochs", "2", "--data-dir", str(other)]
    )
    assert "not those the checkpoint was trained on" in msg


def test_rows_the_loss_and_images_that_cannot_be_right_are_refused(tmp_path):
    """--compare refuses rows with a negative index or a label outside the record's classes;
    macer_loss refuses a target of -100 at lambda = 0 as at lambda > 0 (nll_loss would skip it);
    Smooth refuses a uint8 image, takes a float64 one, and warns on an image in 0-255."""
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    record = json.dumps(toy_settings(dataset="fashion-mnist"))
    for rows, words in [([(-7, 1, 1, 0.1)], "input -7"), ([(0, 12, 1, 0.1)], "label 12")]:
        write_tsv(a, rows)
        write_tsv(b, rows)
        for p in (a, b):
            Path(records.settings_path(str(p))).write_text(record)
        assert words in one_line_error(certify.main, ["--compare", str(a), str(b)])
    y = torch.tensor([0, -100])
    for lbd in (0.0, 1.0):
        with pytest.raises((ValueError, RuntimeError, IndexError)):
            macer_loss(torch.randn(2, 3, 10), y, 0.25, lbd, 8.0, 16.0)
    smooth = Smooth(models.get_model("fashion-mnist"), 10, 0.25)
    image = torch.rand(1, 28, 28)
    with pytest.raises(ValueError, match="floating-point"):
        smooth.certify((image * 255).to(torch.uint8), 10, 100, 0.001, 50)
    label, R = smooth.certify(image.double(), 10, 100, 0.001, 50)  # float64 is taken, not refused
    assert -1 <= label < 10 and R >= 0.0
    with pytest.warns(UserWarning, match=r"images go in \[0, 1\]"):
        smooth.certify(image * 255, 10, 100, 0.001, 50)


def test_a_foreign_file_is_refused_before_a_byte_changes(tmp_path):
    """A Cohen-format file made by another tool (no settings record) whose last line has no
    newline, or a header with a line of free text: refused, every byte as it was. A FIFO where the
    settings record goes is refused without blocking."""
    for text in (
        records.HEADER + "\n0\t3\t3\t0.5\t1\t0:00:01.2\n5\t1\t1\t0.3\t1\t0:00:01.1",
        records.HEADER + "\nnotes on this run",
    ):
        out = tmp_path / "cohen.tsv"
        out.write_text(text)
        with pytest.raises(ValueError, match="no settings record"):
            cert(out, [0, 1])
        assert out.read_text() == text and not Path(records.settings_path(str(out))).exists()
    fifo = tmp_path / "f.tsv"
    os.mkfifo(records.settings_path(str(fifo)))
    assert records.read_settings(str(fifo), strict=False) is None
    with pytest.raises(ValueError, match="not a readable settings record"):
        records.read_settings(str(fifo))


def test_more_mistakes_end_in_one_sentence(lenet_ckpt, tiny_fmnist, tmp_path, monkeypatch):
    """Each of these once ended in a traceback or a misleading line."""
    base = [lenet_ckpt, "--data-dir", tiny_fmnist, "--max", "1", "--n", "100"]
    png_dir = tmp_path / "p.png"
    png_dir.mkdir()
    for argv, words in [
        (base + ["--out", str(tmp_path / "p.tsv"), "--plot"], "a folder"),
        (base + ["--n", "99999999999999999999999"], "at most 2^53"),
        (base + ["--out", ""], "--out needs a file name"),
        ([lenet_ckpt, "--compare", "a.tsv", "b.tsv"], "--compare reads results files only"),
        (["--compare", "a.tsv", "b.tsv", "--plot"], "--compare reads results files only"),
    ]:
        assert words in one_line_error(certify.main, argv), argv
    assert not (tmp_path / "p.tsv").exists()  # refused before any work

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = str(tmp_path / "q.tsv")
    with monkeypatch.context() as m:
        m.setattr(records, "plot_curve", disk_full)
        msg = one_line_error(certify.main, base + ["--out", out, "--plot"])
    assert "the rows are saved" in msg and len(records.read_tsv(out)) == 1
    monkeypatch.undo()
    assert "--k times --batch" in one_line_error(train.main, ["--k", str(2**63 - 1)])
    sd = torch.load(lenet_ckpt, weights_only=True)
    for change in (dict(dataset=["fashion-mnist"]), dict(arch=7)):
        torch.save(dict(sd, config=dict(sd["config"], **change)), tmp_path / "odd.pt")
        assert "did not write" in one_line_error(
            certify.main, [str(tmp_path / "odd.pt")] + base[1:]
        )
    empty = tmp_path / "empty" / "FashionMNIST" / "raw"
    empty.mkdir(parents=True)
    write_bars(empty, sizes=(("train", 0), ("t10k", 0)))
    msg = one_line_error(certify.main, base[:1] + ["--data-dir", str(tmp_path / "empty")])
    assert "holds no images" in msg and "t10k-images" in msg
    bad = tmp_path / "latin.tsv"
    bad.write_bytes(b"idx\xff\n")
    msg = one_line_error(certify.main, base + ["--out", str(bad)])
    assert str(bad) in msg and bad.read_bytes() == b"idx\xff\n"


def test_train_passes_paths_that_look_like_flags_and_names_what_stopped_certifying(
    tiny_fmnist, tmp_path, monkeypatch
):
    """--out-dir=-x trains and certifies into -x (it once reached certify.py as a flag); a
    deleted settings record is named as such when a resume certifies again, not blamed on other
    --cert-* settings."""
    monkeypatch.chdir(tmp_path)
    flags = ["--data-dir", tiny_fmnist, "--out-dir=-x", "--epochs", "1", "--k", "1"]
    flags += ["--train-subset", "64", "--cert-n", "100", "--cert-skip", "50", "--cert-max", "2"]
    train.main(flags)
    assert len(records.read_tsv(str(tmp_path / "-x" / "certify.tsv"))) == 2
    os.remove(tmp_path / "-x" / "certify_settings.json")
    msg = one_line_error(train.main, flags + ["--resume", "--cert-max", "3"])
    assert "no settings record" in msg and "--cert-*" not in msg


def test_compare_names_beta_and_a_nan_sigma_names_the_record(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    write_tsv(a, [(0, 1, 1, 0.1)])
    write_tsv(b, [(0, 1, 1, 0.1)])
    soft = dict(bound="bernstein")
    Path(records.settings_path(str(a))).write_text(json.dumps(toy_settings(beta=16.0, **soft)))
    Path(records.settings_path(str(b))).write_text(json.dumps(toy_settings(beta=1.0, **soft)))
    (pair,) = records.compare([str(a), str(b)])["pairs"]
    assert any("beta" in note for note in pair["notes"])
    Path(records.settings_path(str(a))).write_text('{"sigma": NaN, "n": 100}')
    with pytest.raises(ValueError, match="settings record lacks a valid sigma") as e:
        records.read_rows(str(a))
    assert "line 2" not in str(e.value)


# ================================================================ the GPU check and --compile
@pytest.mark.parametrize("device", DEVICES)
def test_certify_compiles_the_network_and_records_it(lenet_ckpt, tiny_fmnist, tmp_path, device):
    """certify.py --compile certifies with the torch.compile'd network; the settings record says
    so (to inform: compiled kernels round like another CPU's, as the machine does)."""
    out = tmp_path / "compiled.tsv"
    base = [lenet_ckpt, "--data-dir", tiny_fmnist, "--n", "200", "--max", "2", "--skip", "50"]
    certify.main(base + ["--compile", "--device", device, "--out", str(out)])
    assert len(records.read_tsv(str(out))) == 2 and records.read_settings(str(out))["compile"]


def test_the_gpu_check_runs_here_with_its_cuda_parts_listed(tmp_path):
    """.ci/gpu end to end: on a machine without a GPU it lists its CUDA parts as skipped and runs
    the training epoch and the certification small on the CPU; its JSON holds every part."""
    if CUDA:
        pytest.skip("on a GPU, .ci/gpu runs for minutes: run it by hand")
    out = tmp_path / "gpu.json"
    log = run(os.path.join(".ci", "gpu"), str(out))
    parts = {p["name"]: p["status"] for p in json.loads(out.read_text())["parts"]}
    assert parts["epoch"] == parts["certify"] == "ok", log
    assert all(parts[name].startswith("skipped") for name in ("suite", "bench", "compile"))


def test_a_sigma_the_paper_does_not_list_says_which_lambda_it_takes(tiny_fmnist, tmp_path, capsys):
    flags = ["--data-dir", tiny_fmnist, "--out-dir", str(tmp_path), "--epochs", "1", "--k", "1"]
    train.main(flags + ["--train-subset", "64", "--cert-max", "0", "--sigma", "0.3"])
    assert "no lambda for sigma 0.3: the nearest sigma's, 16" in capsys.readouterr().out


def test_the_readme_snippet_runs_in_a_folder_with_only_the_files_it_names(tmp_path):
    """README.md's loss snippet, as told: in an empty folder with macer.py and certify.py copied
    in and nothing else of the project, it trains a step and certifies."""
    readme = Path(HERE, "README.md").read_text()
    section = readme[readme.index("## The loss in your own training loop") :]
    start = section.index("```python\n") + len("```python\n")
    snippet = section[start : section.index("\n```", start)]
    for name in ("macer.py", "certify.py"):
        (tmp_path / name).write_text(Path(HERE, name).read_text())
    (tmp_path / "snippet.py").write_text(snippet)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(
        [sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert p.returncode == 0, p.stderr
    label, radius = p.stdout.split()
    assert int(label) in range(-1, 10) and float(radius) >= 0


def test_what_a_second_reader_found_ends_right(lenet_ckpt, tiny_fmnist, tmp_path, monkeypatch):
    """Cases an adversarial reader found: each now refused in one sentence, or right."""
    base = [lenet_ckpt, "--data-dir", tiny_fmnist, "--max", "1", "--n", "100"]
    write_tsv(tmp_path / "a.tsv", [(0, 1, 1, 0.1)])
    write_tsv(tmp_path / "b.tsv", [(0, 1, 1, 0.2)])
    a, b = str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")
    assert "more than one pair" in one_line_error(certify.main, ["--compare", a, b, a, b])
    os.mkfifo(tmp_path / "fifo.tsv")
    msg = one_line_error(certify.main, ["--compare", a, str(tmp_path / "fifo.tsv")])
    assert "not a regular file" in msg  # and no hang
    os.mkfifo(tmp_path / "fifo.pt")
    assert "not a regular file" in one_line_error(certify.main, [str(tmp_path / "fifo.pt")])
    for argv, words in [
        (base + ["--alpha", "0.9999999999999999"], "rounds to 1"),
        (
            base + ["--n", str(2**53), "--batch", str(2**53), "--out", str(tmp_path / "h.tsv")],
            "--batch",
        ),
    ]:
        assert words in one_line_error(certify.main, argv), argv
    sd = torch.load(lenet_ckpt, weights_only=True)
    torch.save(dict(sd, config=dict(sd["config"], beta=torch.tensor(16.0))), tmp_path / "t.pt")
    assert "did not write" in one_line_error(certify.main, [str(tmp_path / "t.pt")] + base[1:])
    torch.save(dict(arch="", state_dict=sd["model"]), tmp_path / "cohen_like.pt")
    flags = ["--dataset", "fashion-mnist", "--arch", "lenet", "--sigma", "0.25"]
    certify.main([str(tmp_path / "cohen_like.pt")] + base[1:] + flags)  # '' records no arch
    out = tmp_path / "mine.tsv"
    Path(records.settings_path(str(out))).write_text('{"my": "own"}')
    assert "not a settings record" in one_line_error(certify.main, base + ["--out", str(out)])
    assert Path(records.settings_path(str(out))).read_text() == '{"my": "own"}'
    assert not out.exists()  # refused: the empty results file it began is gone again
    (tmp_path / "p.png").write_text("my own picture")
    msg = one_line_error(certify.main, base + ["--out", str(tmp_path / "p.tsv"), "--plot"])
    assert "not drawn by certify.py" in msg and (tmp_path / "p.png").read_text() == "my own picture"
    for _ in range(2):  # its own plot it draws, and redraws
        certify.main(base + ["--out", str(tmp_path / "q.tsv"), "--plot"])
    Path(records.settings_path(a)).write_text("[" * 100_000 + "]" * 100_000)
    assert records.read_settings(a, strict=False) is None
    with pytest.raises(ValueError, match="not a readable settings record"):
        records.read_settings(a)
    certify.main(base + ["--bf16", "--out", str(tmp_path / "bf16.tsv")])  # Smooth takes FastPath
    assert records.read_settings(str(tmp_path / "bf16.tsv"))["precision"] == "bf16"
    stale = tmp_path / "stale.tsv"  # a record whose run wrote no row: it binds no precision
    stale.write_text(records.HEADER + "\n")
    Path(records.settings_path(str(stale))).write_text(json.dumps(toy_settings(precision="bf16")))
    certify.main(base + ["--out", str(stale)])
    assert records.read_settings(str(stale))["precision"] == "fp32"
    with pytest.raises(ValueError, match="sigma must be"):
        Smooth(Stub(), 3, 10**400)
    with pytest.raises(ValueError, match="bfloat16"):
        Smooth(models.get_model("fashion-mnist").bfloat16(), 10, 0.25).certify(
            torch.rand(1, 28, 28), 10, 100, 0.001, 50
        )
    with pytest.warns(UserWarning, match=r"images go in \[0, 1\]"):
        Smooth(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), 2, 0.25).certify(
            torch.full((2, 2), 200.0), 10, 100, 0.001, 50
        )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(data.IDX, "fashion-mnist", ("FashionMNIST", str(tmp_path / "nowhere")))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no download, here or anywhere
    one_line_error(train.main, ["--out-dir", "fresh", "--data-dir", str(tmp_path / "no")])
    assert not (tmp_path / "fresh").exists()  # a run that stopped at once leaves no folder
