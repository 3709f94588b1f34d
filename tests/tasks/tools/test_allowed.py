"""The machine's allow-list of tool sources (tasks/tools/allowed.py): a source it does not
name is refused before anything of it is imported or started."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tasks.tools.test_toolbox import CRASHY, call, run, spec
from thinkbatch.tasks.tools.tool import ToolboxError
from thinkbatch.tasks.tools.toolbox import Toolbox

ENV = "THINKBATCH_ALLOWED_TOOL_SOURCES"
TOOLS = '''
from pathlib import Path
Path(__file__).with_name("imported").touch()  # what importing a module can do


def double(n: int) -> int:
    return 2 * n
'''


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    (tmp_path / "tools.py").write_text(TOOLS)
    (tmp_path / "sub").mkdir()
    return tmp_path


def test_sources_outside_the_allow_list_are_refused_before_they_run(
        job_dir: Path, monkeypatch: pytest.MonkeyPatch):
    starts = job_dir / "starts"
    server = {"mcp": {"command": ["python", str(CRASHY)], "env": {"STARTS_FILE": str(starts)}}}
    monkeypatch.setenv(ENV, f"python:{job_dir}/sub/*.py; url:http://search:8000/*")
    with pytest.raises(ToolboxError) as refused:
        Toolbox.open(spec({"python": "sub/../tools.py"}, server,
                          {"mcp": {"url": "http://user:pw@search:8000/mcp?key=k"}},
                          {"recorded": {"column": "results"}}), job_dir)
    assert str(refused.value) == (
        f"rollout.tools[0] (python sub/../tools.py): python:{job_dir}/tools.py is not allowed "
        f"here ({ENV} names the tool sources this machine runs); rollout.tools[1] (mcp "
        f"['python', '{CRASHY}']): mcp:python {CRASHY} is not allowed here ({ENV} names the "
        "tool sources this machine runs)")
    assert not (job_dir / "imported").exists() and not starts.exists()

    monkeypatch.setenv(ENV, f"python:{job_dir}/tools.py\nmcp:python {CRASHY}")
    with Toolbox.open(spec({"python": "tools.py"}, server), job_dir) as box:
        [r] = run(box, [call("double", n=2)])
    assert r.content == "4" and (job_dir / "imported").exists() and starts.exists()

    monkeypatch.setenv(ENV, "module:tools")
    with pytest.raises(ToolboxError, match=f"{ENV}: 'module:tools' is not KIND:PATTERN"):
        Toolbox.open(spec({"python": "tools.py"}), job_dir)
