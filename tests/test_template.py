"""The deployment files: template.yaml (AWS SAM) and the Lambda container image's Dockerfile.

Neither `sam build` nor `docker build` can run here (no Docker engine), so these tests check
what can be checked without one: cfn-lint, and the stack CloudFormation would create for given
parameter values (conditions evaluated, `Fn::If` taken, `AWS::NoValue` dropped, parameters
substituted): who may call it, what its role may do, its limits, alarms, logs and settings;
then the Dockerfile's base image, COPY sources and CMD."""

from __future__ import annotations

import ast
import copy
import fnmatch
import json
import re
import tomllib
from typing import Any, get_args, get_type_hints

import pytest

from lazyserve.settings import Settings, load_settings, parse_model_uri
from tests.helpers import (
    FUNCTION,
    ISSUER,
    JWT,
    PSEUDO,
    REQUIRED,
    ROOT,
    S3_READ,
    Stack,
    cfn_lint,
    check_alarms,
    check_alarms_notify_a_topic_or_none,
    check_bounded_rate_and_concurrency,
    check_json_logs_with_retention,
    check_kms_key_adds_decrypt_through_s3,
    check_no_kms_without_a_key,
    check_only_none_opens_the_api,
    check_prefix_reads_below_it,
    check_role_reads_only_the_model,
    check_signed_requests_only,
    check_task_root_readable,
    copies,
    grants,
    instructions,
    load_template,
    parameter_problem,
    routes,
)

TEMPLATE = ROOT / "template.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template(TEMPLATE)


@pytest.fixture(scope="module")
def defaults(template: dict[str, Any]) -> Stack:
    """The stack a user gets who gives only the bucket and the key."""
    return Stack(template)


# -- template.yaml: lint and shape ---------------------------------------------------------


def test_cfn_lint_is_clean() -> None:
    done = cfn_lint(TEMPLATE)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_the_function_is_a_container_image_built_from_the_dockerfile(
    template: dict[str, Any], defaults: Stack
) -> None:
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    functions = [k for k, v in template["Resources"].items() if "Function" in v["Type"]]
    assert functions == [FUNCTION]
    resource = template["Resources"][FUNCTION]
    assert resource["Type"] == "AWS::Serverless::Function"
    assert (ROOT / resource["Metadata"]["DockerContext"] / resource["Metadata"]["Dockerfile"]) == (
        DOCKERFILE
    )
    function = defaults.function
    assert function["PackageType"] == "Image"
    assert function["Architectures"] == ["x86_64"]
    assert function["MemorySize"] == "3008"


def test_every_parameter_and_its_default(template: dict[str, Any]) -> None:
    # docs/deploy.md documents each of them (tests/test_deploy_docs.py holds it to this list).
    defaults = {name: p.get("Default") for name, p in template["Parameters"].items()}
    assert defaults == {
        "ModelBucket": None,
        "ModelKey": None,
        "ModelVersionId": "",
        "ModelSha256": "",
        "ModelKmsKeyArn": "",
        "MemorySize": 3008,
        "Architecture": "x86_64",
        "LoadMode": "background",
        "MemoryBudget": "",
        "RefreshSeconds": "",
        "ApplicationLogLevel": "INFO",
        "LogRetentionDays": 30,
        "ReservedConcurrency": 10,
        "ApiAuth": "iam",
        "JwtIssuer": "",
        "JwtAudience": "",
        "ApiThrottleRate": 10,
        "ApiThrottleBurst": 20,
        "Alarms": "enabled",
        "AlarmTopicArn": "",
        "ModelLoadAlarmSeconds": 20,
    }
    params = template["Parameters"]
    assert (params["MemorySize"]["MinValue"], params["MemorySize"]["MaxValue"]) == (128, 10240)
    assert sorted(params["Architecture"]["AllowedValues"]) == ["arm64", "x86_64"]
    # Every load mode the template offers is one the settings accept, and vice versa.
    load_modes = get_args(get_type_hints(Settings)["load"])
    assert sorted(params["LoadMode"]["AllowedValues"]) == sorted(load_modes)


def test_the_timeout_leaves_room_for_the_load_wait(defaults: Stack) -> None:
    # A request waits LAZYSERVE_LOAD_WAIT for a load and then answers 503 itself; the function
    # must outlive that wait (API Gateway's own limit is 29-30 s).
    assert defaults.function["Timeout"] == 30
    assert Settings.__dataclass_fields__["load_wait"].default < 30


def test_outputs_name_the_endpoints_and_the_function(template: dict[str, Any]) -> None:
    outputs = {name: output["Value"] for name, output in template["Outputs"].items()}
    assert outputs["ApiUrl"] == {"Fn::Sub": "${HttpApi.ApiEndpoint}/"}
    assert outputs["ApiExecuteArn"] == {
        "Fn::Sub": "arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:${HttpApi}/*"
    }
    # <function>Url is the logical id SAM gives the resource it makes for FunctionUrlConfig.
    assert outputs["FunctionUrl"] == {"Fn::GetAtt": [f"{FUNCTION}Url", "FunctionUrl"]}
    assert outputs["FunctionArn"] == {"Fn::GetAtt": [FUNCTION, "Arn"]}
    assert outputs["LogGroupName"] == {"Ref": "FunctionLogGroup"}


# -- who may call it -----------------------------------------------------------------------


def test_the_http_api_serves_every_path_through_the_function(defaults: Stack) -> None:
    (api,) = defaults.of_type("AWS::ApiGatewayV2::Api").values()
    assert api["ProtocolType"] == "HTTP"
    assert set(routes(defaults)) == {"ANY /", "ANY /{proxy+}"}
    integration = defaults.resources["HttpApiIntegration"]["Properties"]
    assert (integration["IntegrationType"], integration["PayloadFormatVersion"]) == (
        "AWS_PROXY",
        "2.0",
    )
    assert "<LazyserveFunction.Arn>" in integration["IntegrationUri"]
    (permission,) = defaults.of_type("AWS::Lambda::Permission").values()
    assert permission == {
        "Action": "lambda:InvokeFunction",
        "FunctionName": "<LazyserveFunction>",
        "Principal": "apigateway.amazonaws.com",
        # This API only, not any API Gateway API in the account.
        "SourceArn": "arn:aws:execute-api:eu-west-1:123456789012:<HttpApi>/*",
    }


def test_every_route_requires_signed_iam_requests_by_default(template: dict[str, Any]) -> None:
    check_signed_requests_only(template)


def test_jwt_routes_check_the_bearer_token_against_issuer_and_audience(
    template: dict[str, Any],
) -> None:
    stack = Stack(template, **JWT)
    (authorizer,) = stack.of_type("AWS::ApiGatewayV2::Authorizer").values()
    assert authorizer == {
        "ApiId": "<HttpApi>",
        "Name": "jwt",
        "AuthorizerType": "JWT",
        "IdentitySource": ["$request.header.Authorization"],
        "JwtConfiguration": {"Issuer": ISSUER, "Audience": ["client-a", "client-b"]},
    }
    for key, route in routes(stack).items():
        assert (route["AuthorizationType"], route["AuthorizerId"]) == (
            "JWT",
            "<HttpApiJwtAuthorizer>",
        ), key
    assert stack.rule_failures() == []
    assert stack.function["FunctionUrlConfig"] == {"AuthType": "AWS_IAM"}


@pytest.mark.parametrize(
    ("issuer", "audience", "failures"),
    [
        ("", "client-a", ["JwtIssuer"]),
        (ISSUER, "", ["JwtAudience"]),
        ("", "", ["JwtIssuer", "JwtAudience"]),
    ],
)
def test_jwt_without_issuer_or_audience_is_refused_before_anything_is_created(
    template: dict[str, Any], issuer: str, audience: str, failures: list[str]
) -> None:
    stack = Stack(template, ApiAuth="jwt", JwtIssuer=issuer, JwtAudience=audience)
    refused = stack.rule_failures()
    assert len(refused) == len(failures)
    for message, parameter in zip(refused, failures, strict=True):
        assert f"ApiAuth=jwt needs {parameter}" in message
    with pytest.raises(AssertionError, match="does not match"):
        Stack(template, ApiAuth="jwt", JwtIssuer="http://not-tls.example.com", JwtAudience="a")


def test_only_an_explicit_none_opens_the_api_to_anyone(template: dict[str, Any]) -> None:
    check_only_none_opens_the_api(template)


# -- bounded scale and cost ----------------------------------------------------------------


def test_request_rate_and_concurrency_are_bounded_by_default(template: dict[str, Any]) -> None:
    check_bounded_rate_and_concurrency(template)


def test_the_limits_follow_their_parameters(template: dict[str, Any]) -> None:
    stack = Stack(template, ApiThrottleRate="250", ApiThrottleBurst="500", ReservedConcurrency="40")
    (stage,) = stack.of_type("AWS::ApiGatewayV2::Stage").values()
    assert stage["DefaultRouteSettings"] == {
        "ThrottlingRateLimit": "250",
        "ThrottlingBurstLimit": "500",
    }
    assert stack.function["ReservedConcurrentExecutions"] == "40"
    # 0 reserves nothing (for accounts with too small a quota), rather than disabling the function.
    assert "ReservedConcurrentExecutions" not in Stack(template, ReservedConcurrency="0").function


def test_logs_are_json_at_the_chosen_level_in_a_log_group_with_retention(
    template: dict[str, Any],
) -> None:
    check_json_logs_with_retention(template)


# -- what the function may do --------------------------------------------------------------


def test_the_role_can_read_only_the_model_object_and_write_its_own_logs(
    template: dict[str, Any],
) -> None:
    check_role_reads_only_the_model(template)


def test_a_key_prefix_grants_reading_the_objects_below_it(template: dict[str, Any]) -> None:
    check_prefix_reads_below_it(template)


@pytest.mark.parametrize(
    ("key", "prefix"),
    [
        ("models/", True),
        ("a/b//", True),
        ("/", True),
        ("digits.safetensors", False),
        ("models/digits.safetensors", False),
        ("a/b/c", False),
        ("odd/|sep", False),
        ("trailing/.", False),
    ],
)
def test_the_key_is_a_prefix_exactly_when_it_ends_in_a_slash(
    template: dict[str, Any], key: str, prefix: bool
) -> None:
    stack = Stack(template, ModelKey=key)
    assert stack.condition("KeyIsPrefix") is prefix
    resource = f"arn:aws:s3:::models-bucket/{key}" + ("*" if prefix else "")
    assert grants(stack)["ReadModelWeights"] == (S3_READ, [resource])


@pytest.mark.parametrize(
    "key", ["*", "models/*", "a?b.safetensors", "a${aws:username}", "tab\there", "nul\x00", ""]
)
def test_keys_iam_would_read_as_wildcards_or_variables_are_refused(
    template: dict[str, Any], key: str
) -> None:
    assert parameter_problem(template["Parameters"]["ModelKey"], key) is not None


def test_no_kms_permission_without_a_key(template: dict[str, Any]) -> None:
    check_no_kms_without_a_key(template)


def test_a_kms_key_adds_exactly_decrypt_through_s3_in_this_region(template: dict[str, Any]) -> None:
    check_kms_key_adds_decrypt_through_s3(template)
    # An alias is not a key: IAM would not match it against the key S3 uses.
    with pytest.raises(AssertionError, match="does not match"):
        Stack(template, ModelKmsKeyArn="arn:aws:kms:eu-west-1:123456789012:alias/models")


# -- alarms --------------------------------------------------------------------------------


def test_alarms_watch_errors_throttles_and_model_load_time(template: dict[str, Any]) -> None:
    check_alarms(template)


def test_alarms_notify_the_topic_when_one_is_given_or_none_when_disabled(
    template: dict[str, Any],
) -> None:
    check_alarms_notify_a_topic_or_none(template)


# -- the settings the function starts with -------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "uri"),
    [
        ({}, "s3://models-bucket/digits/digits.safetensors"),
        (
            {"ModelVersionId": "3HL4kqtJl", "ModelSha256": "ab" * 32},
            "s3://models-bucket/digits/digits.safetensors?versionId=3HL4kqtJl",
        ),
        (
            {"ModelKey": "models/", "MemoryBudget": "512M", "RefreshSeconds": "300"},
            "s3://models-bucket/models/",
        ),
    ],
)
def test_the_parameters_become_valid_settings(
    template: dict[str, Any], overrides: dict[str, str], uri: str
) -> None:
    stack = Stack(template, **overrides)
    env = stack.environment
    assert env["LAZYSERVE_MODEL_URI"] == uri
    assert env["LAZYSERVE_LOAD"] == "background"
    assert env["LAZYSERVE_MEMORY_BUDGET"] == overrides.get("MemoryBudget", "")
    assert env["LAZYSERVE_REFRESH_SECONDS"] == overrides.get("RefreshSeconds", "")
    # Every variable is always set; the empty defaults must read as "unset", not as invalid.
    settings = load_settings(env)
    assert settings.model_sha256 == (overrides.get("ModelSha256") or None)
    assert settings.load == "background"


# Values the template accepts that a URI could garble if it were read as a URL: "+" read as a
# space, "%XX" decoded, "#" starting a fragment, "&" splitting the query, a leading "/" dropped.
KEYS = [
    "digits/digits.safetensors",
    "a b/c+d.safetensors",
    "dir//x.safetensors",
    "ünï/çødé=1&2;3.safetensors",
    "a%20b.safetensors",
    "a#b.safetensors",
    "/lead.safetensors",
]
VERSIONS = ["3HL4kqtJl.Wz_9v", "Ab+Cd/Ef=", "a%2Bb", "x&y"]
PREFIXES = ["models/", "a b+c//", "%41/"]


def round_trip_cases() -> list[Any]:
    cases = [(key, version) for key in KEYS for version in (None, VERSIONS[0])]
    cases += [("digits/digits.safetensors", version) for version in VERSIONS[1:]]
    # A version id pins one object, so a prefix goes without one.
    cases += [(prefix, None) for prefix in PREFIXES]
    return [pytest.param(key, version, id=f"{key!r}-{version!r}") for key, version in cases]


@pytest.mark.parametrize(("key", "version"), round_trip_cases())
def test_every_uri_the_template_builds_parses_back_to_its_parts(
    template: dict[str, Any], key: str, version: str | None
) -> None:
    stack = Stack(template, ModelKey=key, ModelVersionId=version or "")
    uri = parse_model_uri(stack.environment["LAZYSERVE_MODEL_URI"])
    assert (uri.bucket, uri.key, uri.version_id) == ("models-bucket", key, version)


# -- the real SAM transform ----------------------------------------------------------------


class _NoManagedPolicies:
    def load(self) -> dict[str, str]:
        return {}


def test_the_sam_transform_accepts_the_template(
    template: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # cfn-lint checks SAM templates against SAM's schema without running the transform; this
    # runs it, as `sam deploy` and CloudFormation do. aws-sam-translator is not a dependency.
    transform = pytest.importorskip("samtranslator.translator.transform").transform
    monkeypatch.setenv("AWS_DEFAULT_REGION", PSEUDO["AWS::Region"])
    sam_template = copy.deepcopy(template)
    # What `sam build` writes into the built template.
    image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/lazyserve:latest"
    sam_template["Resources"][FUNCTION]["Properties"]["ImageUri"] = image
    out = transform(sam_template, dict(REQUIRED), _NoManagedPolicies())
    kinds = {logical_id: r["Type"] for logical_id, r in out["Resources"].items()}
    assert kinds[FUNCTION] == "AWS::Lambda::Function"
    assert kinds[f"{FUNCTION}Url"] == "AWS::Lambda::Url"
    assert out["Rules"] == template["Rules"]
    # The role is ours: SAM made none, and attached no managed policy.
    assert [k for k, kind in kinds.items() if kind == "AWS::IAM::Role"] == ["FunctionRole"]
    function = out["Resources"][FUNCTION]["Properties"]
    assert function["Role"] == {"Fn::GetAtt": ["FunctionRole", "Arn"]}
    assert function["LoggingConfig"]["LogFormat"] == "JSON"


# -- Dockerfile ----------------------------------------------------------------------------


def test_the_base_image_is_a_current_lambda_python_image() -> None:
    froms = [args for keyword, args in instructions(DOCKERFILE) if keyword == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"public\.ecr\.aws/lambda/python:(\d+)\.(\d+)", froms[0])
    assert match, froms[0]
    assert (int(match.group(1)), int(match.group(2))) >= (3, 12)


def test_the_image_runs_the_reference_handler() -> None:
    cmds = [args for keyword, args in instructions(DOCKERFILE) if keyword == "CMD"]
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


def test_every_copy_source_is_in_the_build_context() -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for sources, _ in copies(DOCKERFILE):
        for source in sources:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), f"COPY {source}: not in the repository"
            hits = [p for p in ignored if fnmatch.fnmatch(path, p)]
            assert not hits, f"COPY {source}: excluded by .dockerignore {hits}"
    destinations = {
        destination for sources, destination in copies(DOCKERFILE) if sources == ["handler/"]
    }
    assert destinations == {"${LAMBDA_TASK_ROOT}/handler/"}


def test_the_weights_are_readable_by_the_functions_user_whatever_their_mode() -> None:
    check_task_root_readable(DOCKERFILE)


def test_the_context_leaves_out_the_venv_and_the_tests() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".venv", ".git", "tests", "benchmarks"} <= ignored


def test_torch_is_the_cpu_build_in_its_own_early_layer() -> None:
    steps = instructions(DOCKERFILE)
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
