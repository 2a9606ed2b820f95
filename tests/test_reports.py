"""HTML reports: `edgekit profile / compress / thresholds --html`, each page opened in headless chromium:
no console message, nothing fetched, every image decoded, a screenshot that is not blank; and the numbers
on the page are the planner's, the ELF's and the report's."""
import json
import re
import socket
import subprocess
import time

import numpy as np
import pytest

import edgekit
from edgekit import cli, datasets
from edgekit.codegen.project import load_project
from edgekit.ir_io import load_graph
from edgekit.targets.elf import section_sizes, sections

from browser import CHROMIUM, assert_page_is_good, load_page

pytest.importorskip("matplotlib")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (scripts/setup.sh installs it)")


def _serve(binary):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(binary), "--listen", str(port)], stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    return proc, f"socket://127.0.0.1:{port}"


@needs_browser
def test_the_browser_check_sees_console_errors_and_broken_images(tmp_path):
    """The check itself: a page that logs, throws and shows an image that does not decode fails it."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>bad</title></head><body>'
                   '<img src="data:image/png;base64,AAAA" alt="broken"><p>some text</p>'
                   '<script>console.error("ek-logged"); notAFunction();</script></body></html>')
    page = load_page(bad, tmp_path / "browser")
    assert any("ek-logged" in m for m in page["console"]) and any("notAFunction" in m for m in page["console"])
    assert page["images"] == [{"alt": "broken", "width": 0, "height": 0, "complete": True}]
    with pytest.raises(AssertionError):
        assert_page_is_good(page, 1)


def test_memory_plan_drawn_is_the_projects(trained_cnn, digits, tmp_path):
    """The plan on the page is the planner's own: the project's arena, no two buffers alive at the same
    step share a byte, and the peak is the most bytes alive at once."""
    from edgekit import report

    out = tmp_path / "cnn"
    edgekit.generate(edgekit.quantize(trained_cnn, digits.x_train[:50]), out)
    plan = report.memory_plan(out)
    record = load_project(out)
    assert plan["arena_bytes"] == record["arena_bytes"] and plan["peak"] == record["arena_lower_bound"]
    graph = load_graph(out)
    assert len(plan["steps"]) == len(graph.ops) + 2
    in_place = {frozenset(p) for p in plan["in_place_pairs"]}  # a layer writing over its input, by design
    for i, a in enumerate(plan["buffers"]):
        assert a["offset"] + a["size"] <= plan["arena_bytes"]
        for j, b in enumerate(plan["buffers"][i + 1:], i + 1):
            if a["first"] <= b["last"] and b["first"] <= a["last"] and frozenset((i, j)) not in in_place:
                assert a["offset"] + a["size"] <= b["offset"] or b["offset"] + b["size"] <= a["offset"], (a, b)
    for step, alive in plan["live"].items():
        assert alive == sum(b["size"] for b in plan["buffers"] if b["first"] <= step <= b["last"])


@needs_browser
def test_profile_html(trained_cnn, digits, tmp_path):
    out = tmp_path / "cnn"
    edgekit.generate(edgekit.quantize(trained_cnn, digits.x_train[:50]), out)
    edgekit.build(out)
    np.save(tmp_path / "x.npy", digits.x_test[:12])
    np.save(tmp_path / "y.npy", digits.y_test[:12])
    proc, url = _serve(out / "model_runner")
    try:
        code = cli.main(["profile", "--port", url, "--project", str(out), "--inputs", str(tmp_path / "x.npy"),
                         "--labels", str(tmp_path / "y.npy"), "--json", str(tmp_path / "r.json"),
                         "--html", str(tmp_path / "report.html")])
    finally:
        proc.kill()
        proc.wait()
    assert code == 0
    html = (tmp_path / "report.html").read_text()
    report = json.loads((tmp_path / "r.json").read_text())
    assert not re.search(r"""(src|href)=["']?(https?:|//)|url\(""", html), "the page refers to something outside"
    assert "equals the numpy reference, bit for bit" in html
    for layer in report["layers"]:
        assert f"<td>{layer['name']}</td>" in html and f"<td>{layer['macs']:,}</td>" in html
    assert f"One static arena of {load_project(out)['arena_bytes']:,} B" in html
    sizes = section_sizes(out / "model_runner")
    assert f"flash {sizes['flash']:,} B" in html
    for sec in sections(out / "model_runner"):
        assert f"<td>{sec['name']}</td><td>{sec['size']:,}</td>" in html
    page = load_page(tmp_path / "report.html", tmp_path / "browser")
    assert page["title"].startswith("edgekit profile")
    assert_page_is_good(page, images=3)  # per-layer bars, memory plan, sections


@needs_browser
def test_compress_html(trained_mlp, tmp_path):
    model_path = tmp_path / "mlp.pt2"
    from edgekit.compress import fxgraph
    fxgraph.export_model(trained_mlp, (64,), model_path)
    (tmp_path / "r.toml").write_text('[[step]]\nkind = "sparsify"\nsparsity = 0.5\nepochs = 1\n\n'
                                     '[[step]]\nkind = "cluster"\nbits = 4\nepochs = 1\n\n'
                                     '[output]\nweights = "auto"\n')
    code = cli.main(["compress", str(model_path), "--recipe", str(tmp_path / "r.toml"), "--data", "digits",
                     "-o", str(tmp_path / "small.pt2"), "--report", str(tmp_path / "r.json"), "--quiet",
                     "--html", str(tmp_path / "compress.html")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    html = (tmp_path / "compress.html").read_text()
    assert "equals the int8 reference executor bit for bit" in html
    for step in report["steps"]:
        assert f"<td>{step['label']}</td>" in html and f"<td>{step['macs']:,}</td>" in html
    assert f"One static arena of {report['final']['arena_bytes']:,} B" in html  # the final project, kept for it
    assert "Flash and RAM by section" in html
    assert_page_is_good(load_page(tmp_path / "compress.html", tmp_path / "browser"), images=3)


@needs_browser
def test_thresholds_html(trained_cnn, digits, tmp_path):
    from edgekit import report
    from edgekit.compress import exits as ex
    multi = ex.add_exits(trained_cnn, ["conv1"], digits, epochs=2, show_progress=False)
    edgekit.generate(edgekit.quantize(multi, digits.x_train[:50]), tmp_path / "out")
    np.save(tmp_path / "x.npy", digits.x_test[:80])
    np.save(tmp_path / "y.npy", digits.y_test[:80])
    code = cli.main(["thresholds", "--project", str(tmp_path / "out"), "--inputs", str(tmp_path / "x.npy"),
                     "--labels", str(tmp_path / "y.npy"), "--json", str(tmp_path / "t.json"),
                     "--html", str(tmp_path / "t.html")])
    assert code == 0
    chosen = json.loads((tmp_path / "t.json").read_text())["chosen"]
    html = (tmp_path / "t.html").read_text()
    shown = "off (full network)" if chosen["threshold"] is None else report.threshold_text(chosen["threshold"])
    assert f"{shown}  (operating point)" in html
    assert f"work {chosen['work_fraction']:.3f} of the full network" in html
    assert_page_is_good(load_page(tmp_path / "t.html", tmp_path / "browser"), images=2)  # curve, memory plan


def test_html_options_fail_before_any_work(tmp_path, capsys):
    code = cli.main(["thresholds", "--project", str(tmp_path), "--inputs", str(tmp_path / "x.npy"), "--labels",
                     str(tmp_path / "y.npy"), "--html", "r.txt"])
    assert code == 1 and "inputs file not found" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(1))
    code = cli.main(["thresholds", "--project", str(tmp_path), "--inputs", str(tmp_path / "x.npy"), "--labels",
                     str(tmp_path / "y.npy"), "--html", str(tmp_path / "r.txt")])
    assert code == 1 and "must be an .html file" in capsys.readouterr().err
