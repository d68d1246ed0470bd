"""The deployment files: template.yaml (AWS SAM) and the Lambda container image's Dockerfile.

Neither `sam build` nor `docker build` can run here (no Docker engine), so these tests check
what can be checked without one: cfn-lint, the IAM policy, the wiring of parameters into the
settings, and the Dockerfile's base image, COPY sources and CMD."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, get_args

import pytest
from cfnlint.decode import decode  # type: ignore[import-untyped]

from lazyserve.settings import Settings, load_settings
from tests.helpers import ROOT

TEMPLATE = ROOT / "template.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
FUNCTION = "LazyserveFunction"
MODEL_ARN = "arn:${AWS::Partition}:s3:::${ModelBucket}/${ModelKey}"


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    decoded, problems = decode(str(TEMPLATE))
    assert not problems, [str(p) for p in problems]
    assert isinstance(decoded, dict)
    return decoded


@pytest.fixture(scope="module")
def function(template: dict[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = template["Resources"][FUNCTION]
    assert resource["Type"] == "AWS::Serverless::Function"
    return resource


# -- template.yaml -------------------------------------------------------------------------


def test_cfn_lint_is_clean() -> None:
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    done = subprocess.run(
        [str(cfn_lint), str(TEMPLATE)], capture_output=True, text=True, timeout=120, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_the_function_is_a_container_image_built_from_the_dockerfile(
    template: dict[str, Any], function: dict[str, Any]
) -> None:
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    assert [k for k, v in template["Resources"].items() if "Function" in v["Type"]] == [FUNCTION]
    assert function["Properties"]["PackageType"] == "Image"
    metadata = function["Metadata"]
    assert (ROOT / metadata["DockerContext"] / metadata["Dockerfile"]).resolve() == DOCKERFILE
    assert function["Properties"]["Architectures"] == [{"Ref": "Architecture"}]
    assert function["Properties"]["MemorySize"] == {"Ref": "MemorySize"}


def statements(function: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for policy in function["Properties"]["Policies"]:
        # A bare string would be an AWS managed policy, a one-key mapping a SAM policy
        # template: both grant more than this function needs.
        assert isinstance(policy, dict) and "Statement" in policy, policy
        found.extend(policy["Statement"])
    return found


def test_the_role_can_read_only_the_model_object(function: dict[str, Any]) -> None:
    (statement,) = statements(function)
    assert statement["Effect"] == "Allow"
    actions = statement["Action"]
    assert sorted([actions] if isinstance(actions, str) else actions) == [
        "s3:GetObject",
        "s3:GetObjectVersion",
    ]
    assert statement["Resource"] in ({"Fn::Sub": MODEL_ARN}, [{"Fn::Sub": MODEL_ARN}])
    assert "NotAction" not in statement and "NotResource" not in statement
    assert "*" not in json.dumps(statement)
    # Nothing else in the function grants permissions on its own.
    assert "Role" not in function["Properties"]
    assert "ManagedPolicyArns" not in function["Properties"]


def test_the_function_url_requires_signed_requests(function: dict[str, Any]) -> None:
    assert function["Properties"]["FunctionUrlConfig"]["AuthType"] == "AWS_IAM"


def test_an_http_api_serves_every_path(function: dict[str, Any]) -> None:
    routes = {
        (event["Properties"]["Method"], event["Properties"]["Path"])
        for event in function["Properties"]["Events"].values()
        if event["Type"] == "HttpApi"
    }
    assert routes == {("ANY", "/"), ("ANY", "/{proxy+}")}


def test_outputs_name_the_endpoints_and_the_function(template: dict[str, Any]) -> None:
    outputs = {name: json.dumps(output["Value"]) for name, output in template["Outputs"].items()}
    # ServerlessHttpApi and <function>Url are the logical ids SAM gives the resources it
    # generates for an implicit HTTP API and for FunctionUrlConfig.
    assert "${ServerlessHttpApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}" in outputs["ApiUrl"]
    assert json.loads(outputs["FunctionUrl"]) == {"Fn::GetAtt": [f"{FUNCTION}Url", "FunctionUrl"]}
    assert json.loads(outputs["FunctionArn"]) == {"Fn::GetAtt": [FUNCTION, "Arn"]}


def test_parameters(template: dict[str, Any]) -> None:
    params = template["Parameters"]
    assert {"ModelBucket", "ModelKey"} <= params.keys()
    assert params["ModelVersionId"]["Default"] == ""
    assert params["ModelSha256"]["Default"] == ""
    memory = params["MemorySize"]
    assert (memory["Type"], memory["Default"], memory["MinValue"], memory["MaxValue"]) == (
        "Number",
        3008,
        128,
        10240,
    )
    assert sorted(params["Architecture"]["AllowedValues"]) == ["arm64", "x86_64"]
    # Every load mode the template offers is one the settings accept, and vice versa.
    load_modes = get_args(Settings.model_fields["load"].annotation)
    assert sorted(params["LoadMode"]["AllowedValues"]) == sorted(load_modes)
    assert params["LoadMode"]["Default"] == "background"


def test_the_timeout_leaves_room_for_the_load_wait(function: dict[str, Any]) -> None:
    # A request waits LAZYSERVE_LOAD_WAIT for a load and then answers 503 itself; the function
    # must outlive that wait (API Gateway's own limit is 29-30 s).
    assert function["Properties"]["Timeout"] == 30
    assert Settings.model_fields["load_wait"].default < 30


def _evaluate(value: Any, params: dict[str, str], conditions: dict[str, bool]) -> Any:
    """Resolve the intrinsic functions the environment uses (Ref, Sub, If)."""
    if isinstance(value, str):
        return value
    ((name, arg),) = value.items()
    if name == "Ref":
        return params[arg]
    if name == "Fn::Sub":
        return re.sub(r"\$\{([^}]+)\}", lambda m: params[m.group(1)], arg)
    if name == "Fn::If":
        condition, then, otherwise = arg
        return _evaluate(then if conditions[condition] else otherwise, params, conditions)
    raise AssertionError(f"unexpected intrinsic function {name}")


@pytest.mark.parametrize(
    ("version", "sha256", "uri"),
    [
        ("", "", "s3://models-bucket/digits/digits.safetensors"),
        (
            "3HL4kqtJl",
            "ab" * 32,
            "s3://models-bucket/digits/digits.safetensors?versionId=3HL4kqtJl",
        ),
    ],
)
def test_the_parameters_become_valid_settings(
    template: dict[str, Any], function: dict[str, Any], version: str, sha256: str, uri: str
) -> None:
    params = {
        "ModelBucket": "models-bucket",
        "ModelKey": "digits/digits.safetensors",
        "ModelVersionId": version,
        "ModelSha256": sha256,
        "LoadMode": template["Parameters"]["LoadMode"]["Default"],
    }
    # HasVersion: the version id is not empty.
    assert template["Conditions"]["HasVersion"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "ModelVersionId"}, ""]}]
    }
    conditions = {"HasVersion": version != ""}
    variables = function["Properties"]["Environment"]["Variables"]
    env = {name: _evaluate(value, params, conditions) for name, value in variables.items()}
    assert env["LAZYSERVE_MODEL_URI"] == uri
    settings = load_settings(env)
    assert settings.uri.bucket == "models-bucket"
    assert settings.uri.key == "digits/digits.safetensors"
    assert settings.uri.version_id == (version or None)
    # The empty default means "no digest check", not an invalid digest.
    assert settings.model_sha256 == (sha256 or None)
    assert settings.load == "background"


# -- Dockerfile ----------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        found.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


def test_the_base_image_is_a_current_lambda_python_image() -> None:
    froms = [args for keyword, args in instructions() if keyword == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"public\.ecr\.aws/lambda/python:(\d+)\.(\d+)", froms[0])
    assert match, froms[0]
    assert (int(match.group(1)), int(match.group(2))) >= (3, 12)


def test_the_image_runs_the_reference_handler() -> None:
    cmds = [args for keyword, args in instructions() if keyword == "CMD"]
    assert len(cmds) == 1
    assert json.loads(cmds[0]) == ["handler.app.handler"]
    module = ast.parse((ROOT / "handler" / "app.py").read_text())
    assigned = {
        target.id
        for node in module.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert "handler" in assigned


def copies() -> list[tuple[list[str], str]]:
    found = []
    for keyword, args in instructions():
        if keyword in ("COPY", "ADD"):
            *sources, destination = [w for w in shlex.split(args) if not w.startswith("--")]
            found.append((sources, destination))
    return found


def test_every_copy_source_is_in_the_build_context() -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for sources, _ in copies():
        for source in sources:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), f"COPY {source}: not in the repository"
            hits = [p for p in ignored if fnmatch.fnmatch(path, p)]
            assert not hits, f"COPY {source}: excluded by .dockerignore {hits}"
    destinations = {destination for sources, destination in copies() if sources == ["handler/"]}
    assert destinations == {"${LAMBDA_TASK_ROOT}/handler/"}


def test_the_context_leaves_out_the_venv_and_the_tests() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".venv", ".git", "tests", "benchmarks"} <= ignored


def test_torch_is_the_cpu_build_in_its_own_early_layer() -> None:
    steps = instructions()
    runs = [i for i, (keyword, args) in enumerate(steps) if keyword == "RUN" and "pip" in args]
    torch_step, package_step = runs[0], runs[1]
    torch_args = steps[torch_step][1]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_args
    assert re.search(r"\btorch\b", torch_args)
    assert "-c /tmp/lazyserve/constraints.txt" in torch_args
    assert re.search(r"^torch==\d", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    # The code arrives only after the torch layer, so editing it does not rebuild that layer.
    first_code_copy = min(
        i for i, (keyword, args) in enumerate(steps) if keyword == "COPY" and "src/" in args
    )
    assert torch_step < first_code_copy < package_step
    # The package itself: installed (not editable), torch held to the same pin.
    package_args = steps[package_step][1]
    assert " -e " not in f" {package_args} " and "--editable" not in package_args
    assert "-c /tmp/lazyserve/constraints.txt /tmp/lazyserve" in package_args


# -- samconfig.toml ------------------------------------------------------------------------


def test_sam_defaults_keep_local_containers_warm_and_resolve_the_image_repository() -> None:
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    assert config["version"] == 0.1
    deploy = config["default"]["deploy"]["parameters"]
    assert deploy["capabilities"] == "CAPABILITY_IAM"
    assert deploy["resolve_image_repos"] is True
    assert config["default"]["local_start_api"]["parameters"]["warm_containers"] == "EAGER"
