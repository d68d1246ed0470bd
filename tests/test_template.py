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
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, get_args

import pytest
from cfnlint.decode import decode  # type: ignore[import-untyped]

from lazyserve.metrics import NAMESPACE
from lazyserve.settings import Settings, load_settings, parse_model_uri
from tests.helpers import ROOT

TEMPLATE = ROOT / "template.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
FUNCTION = "LazyserveFunction"
REQUIRED = {"ModelBucket": "models-bucket", "ModelKey": "digits/digits.safetensors"}
PSEUDO = {
    "AWS::StackName": "digits-prod",
    "AWS::Region": "eu-west-1",
    "AWS::Partition": "aws",
    "AWS::AccountId": "123456789012",
    "AWS::URLSuffix": "amazonaws.com",
}
KMS_KEY = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:lazyserve-alarms"
ISSUER = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Example"
JWT = {"ApiAuth": "jwt", "JwtIssuer": ISSUER, "JwtAudience": "client-a,client-b"}


class _NoValue:
    def __repr__(self) -> str:
        return "AWS::NoValue"


NO_VALUE = _NoValue()


class Stack:
    """template.yaml as CloudFormation would deploy it for these parameter values (given as
    strings, as CloudFormation receives them; unset ones take their defaults). Resources are
    not created, so `Ref` to one reads `<Id>` and `Fn::GetAtt` reads `<Id.Attribute>`."""

    def __init__(self, template: dict[str, Any], **overrides: str) -> None:
        declared = template["Parameters"]
        assert overrides.keys() <= declared.keys(), overrides.keys() - declared.keys()
        self.template = template
        self.params = {name: str(p["Default"]) for name, p in declared.items() if "Default" in p}
        self.params |= REQUIRED | overrides
        assert self.params.keys() == declared.keys(), declared.keys() - self.params.keys()
        for name, value in self.params.items():
            problem = parameter_problem(declared[name], value)
            assert problem is None, f"{name}={value!r}: {problem}"
        self._conditions: dict[str, bool] = {}

    def condition(self, name: str) -> bool:
        if name not in self._conditions:
            value = self.resolve(self.template["Conditions"][name])
            assert isinstance(value, bool), (name, value)
            self._conditions[name] = value
        return self._conditions[name]

    def creates(self, logical_id: str) -> bool:
        resource = self.template["Resources"][logical_id]
        return "Condition" not in resource or self.condition(resource["Condition"])

    @property
    def resources(self) -> dict[str, dict[str, Any]]:
        """The resources this stack creates, their properties resolved."""
        return {
            logical_id: {
                "Type": resource["Type"],
                "Properties": self.resolve(resource.get("Properties", {})),
            }
            for logical_id, resource in self.template["Resources"].items()
            if self.creates(logical_id)
        }

    def of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        return {
            logical_id: resource["Properties"]
            for logical_id, resource in self.resources.items()
            if resource["Type"] == kind
        }

    @property
    def function(self) -> dict[str, Any]:
        return self.resources[FUNCTION]["Properties"]

    @property
    def environment(self) -> dict[str, str]:
        variables: dict[str, str] = self.function["Environment"]["Variables"]
        return variables

    def rule_failures(self) -> list[str]:
        """The AssertDescription of each rule assertion these parameter values break."""
        failures = []
        for rule in self.template.get("Rules", {}).values():
            if "RuleCondition" in rule and not self.resolve(rule["RuleCondition"]):
                continue
            for assertion in rule["Assertions"]:
                if not self.resolve(assertion["Assert"]):
                    failures.append(assertion["AssertDescription"])
        return failures

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [item for item in map(self.resolve, value) if item is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self._ref(arg)
            if key == "Condition":
                return self.condition(arg)
            if key.startswith("Fn::"):
                return self._function(key, arg)
        resolved = {key: self.resolve(item) for key, item in value.items()}
        return {key: item for key, item in resolved.items() if item is not NO_VALUE}

    def _ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in PSEUDO:
            return PSEUDO[name]
        if name in self.params:
            return self.params[name]
        assert self.creates(name), f"Ref to {name}, which this stack does not create"
        return f"<{name}>"

    def _attribute(self, name: str, attribute: str) -> str:
        assert self.creates(name), f"GetAtt of {name}, which this stack does not create"
        return f"<{name}.{attribute}>"

    def _sub(self, match: re.Match[str]) -> str:
        name = match.group(1)
        if "." in name and not name.startswith("AWS::"):
            return self._attribute(*name.split(".", 1))
        return str(self._ref(name))

    def _function(self, key: str, arg: Any) -> Any:
        if key == "Fn::If":
            name, then, otherwise = arg
            return self.resolve(then if self.condition(name) else otherwise)
        if key == "Fn::Equals":
            left, right = (str(self.resolve(item)) for item in arg)
            return left == right
        if key == "Fn::Not":
            return not self.resolve(arg[0])
        if key == "Fn::And":
            return all(self.resolve(item) for item in arg)
        if key == "Fn::Or":
            return any(self.resolve(item) for item in arg)
        if key == "Fn::Sub":
            assert isinstance(arg, str), "Fn::Sub with a variable map"
            return re.sub(r"\$\{([^!}][^}]*)\}", self._sub, arg)
        if key == "Fn::Join":
            separator, items = arg
            return separator.join(self.resolve(items))
        if key == "Fn::Split":
            separator, text = arg
            return str(self.resolve(text)).split(separator)
        if key == "Fn::Select":
            index, items = arg
            return self.resolve(items)[int(self.resolve(index))]
        if key == "Fn::GetAtt":
            name, attribute = arg.split(".", 1) if isinstance(arg, str) else arg
            return self._attribute(name, attribute)
        raise AssertionError(f"the resolver does not know {key}")


def parameter_problem(declared: dict[str, Any], value: str) -> str | None:
    """What CloudFormation would refuse about a parameter value, or None. (CloudFormation
    matches AllowedPattern with Java regular expressions; the patterns here use only syntax
    that Java and Python read alike.)"""
    if "AllowedValues" in declared and value not in map(str, declared["AllowedValues"]):
        return f"not one of {declared['AllowedValues']}"
    if "AllowedPattern" in declared and not re.fullmatch(declared["AllowedPattern"], value):
        return f"does not match {declared['AllowedPattern']}"
    if not declared.get("MinLength", 0) <= len(value) <= declared.get("MaxLength", 4096):
        return "wrong length"
    if declared["Type"] == "Number":
        number = float(value)
        if number < declared.get("MinValue", number) or number > declared.get("MaxValue", number):
            return "out of range"
    return None


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    decoded, problems = decode(str(TEMPLATE))
    assert not problems, [str(p) for p in problems]
    assert isinstance(decoded, dict)
    return decoded


@pytest.fixture(scope="module")
def defaults(template: dict[str, Any]) -> Stack:
    """The stack a user gets who gives only the bucket and the key."""
    return Stack(template)


def statements(stack: Stack) -> list[dict[str, Any]]:
    """Every IAM statement this stack grants to its function."""
    function = stack.function
    # SAM's Policies would bring AWSLambdaBasicExecutionRole (logs on "*"); the role is ours.
    assert "Policies" not in function and function["Role"] == "<FunctionRole.Arn>"
    found: list[dict[str, Any]] = []
    for logical_id, role in stack.of_type("AWS::IAM::Role").items():
        assert "ManagedPolicyArns" not in role, logical_id
        assert role["AssumeRolePolicyDocument"]["Statement"] == [
            {
                "Effect": "Allow",
                "Principal": {"Service": "lambda.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ]
        for policy in role["Policies"]:
            found.extend(policy["PolicyDocument"]["Statement"])
    assert not stack.of_type("AWS::IAM::Policy") and not stack.of_type("AWS::IAM::ManagedPolicy")
    return found


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def grants(stack: Stack) -> dict[str, tuple[list[str], list[str]]]:
    """Sid -> (actions, resources), after checking nothing is granted on `*` or by negation."""
    found = {}
    for statement in statements(stack):
        assert statement["Effect"] == "Allow"
        assert not {"NotAction", "NotResource", "NotPrincipal"} & statement.keys(), statement
        actions, resources = as_list(statement["Action"]), as_list(statement["Resource"])
        for action in actions:
            assert "*" not in action, f"{statement['Sid']}: wildcard action {action}"
        for resource in resources:
            # A trailing * below a fixed prefix (a key prefix, a log group's streams) only.
            assert "*" not in resource[:-1], resource
            assert not resource.endswith("*") or resource[-2] in "/:", resource
            assert resource.startswith("arn:aws:"), resource
        found[statement["Sid"]] = (sorted(actions), resources)
    return found


# -- template.yaml: lint and shape ---------------------------------------------------------


def test_cfn_lint_is_clean() -> None:
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    done = subprocess.run(
        [str(cfn_lint), str(TEMPLATE)], capture_output=True, text=True, timeout=120, check=False
    )
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
    # docs/DEPLOY.md documents each of them (tests/test_deploy_docs.py holds it to this list).
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
    load_modes = get_args(Settings.model_fields["load"].annotation)
    assert sorted(params["LoadMode"]["AllowedValues"]) == sorted(load_modes)


def test_the_timeout_leaves_room_for_the_load_wait(defaults: Stack) -> None:
    # A request waits LAZYSERVE_LOAD_WAIT for a load and then answers 503 itself; the function
    # must outlive that wait (API Gateway's own limit is 29-30 s).
    assert defaults.function["Timeout"] == 30
    assert Settings.model_fields["load_wait"].default < 30


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


def routes(stack: Stack) -> dict[str, dict[str, Any]]:
    """RouteKey -> route, after checking each one reaches the function through this API."""
    found = {}
    for route in stack.of_type("AWS::ApiGatewayV2::Route").values():
        assert route["ApiId"] == "<HttpApi>"
        assert route["Target"] == "integrations/<HttpApiIntegration>"
        found[route["RouteKey"]] = route
    return found


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


def test_every_route_requires_signed_iam_requests_by_default(
    template: dict[str, Any], defaults: Stack
) -> None:
    assert template["Parameters"]["ApiAuth"]["Default"] == "iam"
    for key, route in routes(defaults).items():
        assert route["AuthorizationType"] == "AWS_IAM", key
        assert "AuthorizerId" not in route, key
    assert not defaults.of_type("AWS::ApiGatewayV2::Authorizer")
    # The Function URL, the other way in, takes signed requests only too.
    assert defaults.function["FunctionUrlConfig"] == {"AuthType": "AWS_IAM"}


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
    for mode in template["Parameters"]["ApiAuth"]["AllowedValues"]:
        stack = Stack(template, **(JWT | {"ApiAuth": mode}))
        types = {route["AuthorizationType"] for route in routes(stack).values()}
        assert types == {"NONE"} if mode == "none" else "NONE" not in types
        # Whatever the API does, the Function URL keeps requiring signatures.
        assert stack.function["FunctionUrlConfig"] == {"AuthType": "AWS_IAM"}
    stack = Stack(template, ApiAuth="none", JwtIssuer=ISSUER)
    assert not stack.of_type("AWS::ApiGatewayV2::Authorizer")
    assert stack.rule_failures() == []


# -- bounded scale and cost ----------------------------------------------------------------


def test_request_rate_and_concurrency_are_bounded_by_default(defaults: Stack) -> None:
    (stage,) = defaults.of_type("AWS::ApiGatewayV2::Stage").values()
    # The $default stage, deployed on every change, so the routes are live and throttled.
    assert (stage["ApiId"], stage["StageName"], stage["AutoDeploy"]) == (
        "<HttpApi>",
        "$default",
        True,
    )
    assert stage["DefaultRouteSettings"] == {
        "ThrottlingRateLimit": "10",
        "ThrottlingBurstLimit": "20",
    }
    assert defaults.function["ReservedConcurrentExecutions"] == "10"


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
    template: dict[str, Any], defaults: Stack
) -> None:
    assert defaults.function["LoggingConfig"] == {
        "LogFormat": "JSON",
        "ApplicationLogLevel": "INFO",
        "LogGroup": "<FunctionLogGroup>",
    }
    assert defaults.of_type("AWS::Logs::LogGroup") == {
        "FunctionLogGroup": {"RetentionInDays": "30"}
    }
    stack = Stack(template, ApplicationLogLevel="DEBUG", LogRetentionDays="365")
    assert stack.function["LoggingConfig"]["ApplicationLogLevel"] == "DEBUG"
    assert stack.of_type("AWS::Logs::LogGroup")["FunctionLogGroup"]["RetentionInDays"] == "365"


# -- what the function may do --------------------------------------------------------------


LOGS = (
    ["logs:CreateLogStream", "logs:PutLogEvents"],
    ["arn:aws:logs:eu-west-1:123456789012:log-group:<FunctionLogGroup>:*"],
)
S3_READ = ["s3:GetObject", "s3:GetObjectVersion"]


def test_the_role_can_read_only_the_model_object_and_write_its_own_logs(defaults: Stack) -> None:
    assert grants(defaults) == {
        "WriteOwnLogs": LOGS,
        "ReadModelWeights": (S3_READ, ["arn:aws:s3:::models-bucket/digits/digits.safetensors"]),
    }


def test_a_key_prefix_grants_reading_the_objects_below_it(template: dict[str, Any]) -> None:
    stack = Stack(template, ModelKey="models/")
    assert grants(stack)["ReadModelWeights"] == (S3_READ, ["arn:aws:s3:::models-bucket/models/*"])
    # Listing under the prefix only: a missing model is then NoSuchKey (a 404), not
    # AccessDenied.
    (listing,) = [s for s in statements(stack) if s.get("Sid") == "ListModelPrefix"]
    assert as_list(listing["Action"]) == ["s3:ListBucket"]
    assert as_list(listing["Resource"]) == ["arn:aws:s3:::models-bucket"]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": "models/*"}}


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


def test_no_kms_permission_without_a_key(defaults: Stack) -> None:
    assert not [s for s in statements(defaults) if "kms" in json.dumps(s).lower()]


def test_a_kms_key_adds_exactly_decrypt_through_s3_in_this_region(template: dict[str, Any]) -> None:
    stack = Stack(template, ModelKmsKeyArn=KMS_KEY)
    (kms,) = [s for s in statements(stack) if "kms" in json.dumps(s).lower()]
    assert as_list(kms["Action"]) == ["kms:Decrypt"]
    assert as_list(kms["Resource"]) == [KMS_KEY]
    assert kms["Condition"] == {"StringEquals": {"kms:ViaService": "s3.eu-west-1.amazonaws.com"}}
    assert grants(stack)["ReadModelWeights"] == grants(Stack(template))["ReadModelWeights"]
    # An alias is not a key: IAM would not match it against the key S3 uses.
    with pytest.raises(AssertionError, match="does not match"):
        Stack(template, ModelKmsKeyArn="arn:aws:kms:eu-west-1:123456789012:alias/models")


# -- alarms --------------------------------------------------------------------------------


def alarms(stack: Stack) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (alarm["Namespace"], alarm["MetricName"]): alarm
        for alarm in stack.of_type("AWS::CloudWatch::Alarm").values()
    }


def test_alarms_watch_errors_throttles_and_model_load_time(defaults: Stack) -> None:
    found = alarms(defaults)
    assert set(found) == {
        ("AWS/Lambda", "Errors"),
        ("AWS/Lambda", "Throttles"),
        (NAMESPACE, "ModelLoadSeconds"),
    }
    function = [{"Name": "FunctionName", "Value": "<LazyserveFunction>"}]
    assert found["AWS/Lambda", "Errors"]["Dimensions"] == function
    assert found["AWS/Lambda", "Throttles"]["Dimensions"] == function
    load = found[NAMESPACE, "ModelLoadSeconds"]
    # lazyserve's metrics carry one dimension, service, valued POWERTOOLS_SERVICE_NAME.
    service = defaults.environment["POWERTOOLS_SERVICE_NAME"]
    assert service == PSEUDO["AWS::StackName"]
    assert load["Dimensions"] == [{"Name": "service", "Value": service}]
    assert (load["Statistic"], load["Threshold"], load["ComparisonOperator"]) == (
        "Maximum",
        "20",
        "GreaterThanThreshold",
    )
    for alarm in found.values():
        # Quiet periods (no invocation, no load) are not alarms; no topic, no notifications.
        assert alarm["TreatMissingData"] == "notBreaching"
        assert "AlarmActions" not in alarm and "OKActions" not in alarm


def test_alarms_notify_the_topic_when_one_is_given(template: dict[str, Any]) -> None:
    for alarm in alarms(Stack(template, AlarmTopicArn=TOPIC)).values():
        assert (alarm["AlarmActions"], alarm["OKActions"]) == ([TOPIC], [TOPIC])


def test_no_alarms_when_disabled(template: dict[str, Any]) -> None:
    assert alarms(Stack(template, Alarms="disabled", AlarmTopicArn=TOPIC)) == {}


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
