"""Kubernetes value syntax: the rules the apiserver applies to names, labels, env vars, quantities and images.

`stagerun validate` and the operator check a manifest's Kubernetes values with these before any object is created,
so a value the apiserver would refuse (an invalid ServiceAccount name, `cpu: lots`, an over-long label value) is
reported with its manifest field at `validate` time instead of as a failed Job creation minutes later.

Each rule is taken from the Kubernetes API validation (v1.31 sources) and says where:
  apimachinery = k8s.io/apimachinery/pkg/util/validation/validation.go
  core         = k8s.io/kubernetes/pkg/apis/core/validation/validation.go
  quantity     = k8s.io/apimachinery/pkg/api/resource/quantity.go
  reference    = github.com/distribution/reference/regexp.go (the image grammar kubelet and registries use)

Every function returns ``None`` for a valid value, else a message that says what the value must look like. All
matching is ``fullmatch`` on ASCII classes: Python's ``$`` also matches before a trailing newline, and ``\\d``/
``\\s`` match non-ASCII digits and spaces, while the apiserver (Go's RE2) matches neither.
"""

from __future__ import annotations

import re

from .fields import Problem
from .quantities import RESOURCE_QUANTITY_PATTERN, resource_quantity_value

# apimachinery IsDNS1123Label: dns1123LabelFmt, DNS1123LabelMaxLength = 63.
DNS1123_LABEL_MAX = 63
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# apimachinery IsDNS1123Subdomain: dns1123SubdomainFmt, DNS1123SubdomainMaxLength = 253.
DNS1123_SUBDOMAIN_MAX = 253
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# apimachinery IsQualifiedName / IsValidLabelValue: qualifiedNameFmt, qualifiedNameMaxLength = LabelValueMaxLength = 63.
NAME_PART_MAX = 63
_NAME_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
# apimachinery IsEnvVarName: envVarNameFmt. (Clusters with the RelaxedEnvironmentVariableValidation gate, beta in
# v1.32, accept any printable ASCII but '='; the strict rule is the one every supported cluster and shell accepts.)
_ENV_VAR_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
# apimachinery ValidateObjectMeta -> ValidateAnnotations: TotalAnnotationSizeLimitB = 256 KiB (keys + values).
ANNOTATIONS_MAX_BYTES = 256 * 1024
# reference: ReferenceRegexp = [domain/]path[:tag][@digest], lowercase path components, tags of at most 128
# characters, and the name (domain and path, without tag or digest) at most NameTotalLengthMax = 255.
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_DOMAIN = (
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_IMAGE = re.compile(
    rf"(?:{_IMAGE_DOMAIN}/)?{_IMAGE_COMPONENT}(?:/{_IMAGE_COMPONENT})*"
    r"(?::[\w][\w.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?",
    re.ASCII,
)
IMAGE_NAME_MAX = 255
# Every amount a pod requests is non-negative (core ValidateResourceQuantityValue), so no sign but '+'.
_QUANTITY = re.compile(RESOURCE_QUANTITY_PATTERN)

_DNS1123_LABEL_RULE = (
    "lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit"
)
_DNS1123_SUBDOMAIN_RULE = (
    "lowercase letters, digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit"
)
_NAME_PART_RULE = "at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"


def dns1123_label(value: str) -> str | None:
    """Names of namespaces, containers, volumes, ports: a DNS-1123 label."""
    if len(value) > DNS1123_LABEL_MAX or not _DNS1123_LABEL.fullmatch(value):
        return f"{value!r} is not a DNS-1123 label ({_DNS1123_LABEL_RULE})"
    return None


def dns1123_subdomain(value: str) -> str | None:
    """Names of ServiceAccounts, Secrets, ConfigMaps, PVCs, PriorityClasses (core NameIsDNSSubdomain)."""
    if len(value) > DNS1123_SUBDOMAIN_MAX or not _DNS1123_SUBDOMAIN.fullmatch(value):
        return f"{value!r} is not a DNS-1123 subdomain ({_DNS1123_SUBDOMAIN_RULE})"
    return None


def object_name(kind: str, value: str) -> str | None:
    """A name of a ``kind`` object (ServiceAccount, Secret, PersistentVolumeClaim, ...): a DNS-1123 subdomain, the
    rule the apiserver applies when such an object is created, so no object of the kind can have another name."""
    problem = dns1123_subdomain(value)
    return f"{value!r} cannot name a {kind}: {_DNS1123_SUBDOMAIN_RULE}" if problem else None


def qualified_name(value: str) -> str | None:
    """Label, annotation, node-selector and resource keys: an optional DNS-subdomain prefix and '/', then a name."""
    prefix, slash, name = value.rpartition("/")
    if slash and (not prefix or dns1123_subdomain(prefix)):
        return (
            f"{value!r} has an invalid prefix {prefix!r}: before '/' comes a DNS subdomain ({_DNS1123_SUBDOMAIN_RULE})"
        )
    if len(name) > NAME_PART_MAX or not _NAME_PART.fullmatch(name):
        return f"{value!r} is not a Kubernetes key: an optional DNS prefix and '/', then {_NAME_PART_RULE}"
    return None


def label_value(value: str) -> str | None:
    """Label and node-selector values: empty, or at most 63 characters of the name alphabet."""
    if value and (len(value) > NAME_PART_MAX or not _NAME_PART.fullmatch(value)):
        return f"{value!r} is not a label value ({_NAME_PART_RULE}, or empty)"
    return None


def annotations_size(annotations: dict[str, str]) -> str | None:
    total = sum(
        len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
        for k, v in annotations.items()
    )
    if total > ANNOTATIONS_MAX_BYTES:
        return f"annotations take {total} bytes; Kubernetes allows at most {ANNOTATIONS_MAX_BYTES} (256 KiB) in all"
    return None


def env_var_name(value: str) -> str | None:
    if not _ENV_VAR_NAME.fullmatch(value):
        return (
            f"{value!r} is not an environment variable name (letters, digits, '_', '-' and '.', not starting with a "
            "digit)"
        )
    return None


def resource_name(value: str) -> str | None:
    """A container resource name (cpu, memory, nvidia.com/gpu): a qualified name; one that is not a standard
    resource must carry a domain (core validateContainerResourceName: extended resources are fully qualified)."""
    problem = qualified_name(value)
    if problem:
        return problem
    if "/" not in value and value not in ("cpu", "memory", "ephemeral-storage") and not value.startswith("hugepages-"):
        return f"{value!r} is not a standard resource; an extended resource names its domain, e.g. nvidia.com/gpu"
    return None


def quantity(value: str, *, positive: bool = False) -> str | None:
    """A resource quantity (cpu: '500m', memory: '64Gi'); ``positive``: zero is refused too."""
    if not _QUANTITY.fullmatch(value):  # quantity: ParseQuantity's serialized form, without a sign
        if value.strip().startswith("-"):
            return f"{value!r} is negative; give a positive amount such as '500m' or '64Gi'"
        return f"{value!r} is not a Kubernetes quantity; write e.g. 1, '500m', '64Gi' or '1e3'"
    if positive and resource_quantity_value(value) <= 0:
        return f"{value!r} is zero; give a positive amount"
    return None


def image_reference(value: str) -> str | None:
    """A container image: [registry[:port]/]path[:tag][@digest] with a lowercase path (reference grammar)."""
    name = value.split("@", 1)[0]
    head, colon, tag = name.rpartition(":")
    name = head if colon and "/" not in tag else name  # a ':' after the last '/' starts the tag, else a port
    if value != value.strip() or not _IMAGE.fullmatch(value) or len(name) > IMAGE_NAME_MAX:
        return (
            f"{value!r} is not a container image reference: [registry[:port]/]path[:tag][@digest], with a lowercase "
            "path and no spaces, e.g. ghcr.io/example/stagerun:0.1"
        )
    return None


# -- where a TrainingRun carries Kubernetes values (spec.podTemplate has its own checks, pod_template.py) ---------


def check_run_values(run, problems: list[Problem]) -> None:
    """Problems with the Kubernetes values of a TrainingRun, each with its manifest field (``run``: a TrainingRun;
    ``problems``: appended to)."""

    def report(path: str, message: str | None, fix: str | None = None) -> None:
        if message:
            problems.append(Problem(path, message, fix))

    metadata, spec = run.metadata, run.spec
    if metadata.namespace is not None:
        report("metadata.namespace", dns1123_label(metadata.namespace), "a namespace name, e.g. 'ml-team'")
    check_labels(metadata.labels or {}, "metadata.labels", problems)
    check_annotations(metadata.annotations or {}, "metadata.annotations", problems)
    if spec.image is not None:
        report("spec.image", image_reference(spec.image))
    if spec.queue_name is not None:  # it becomes the value of the kueue.x-k8s.io/queue-name label
        report("spec.queueName", label_value(spec.queue_name) or ("is empty" if not spec.queue_name else None))
    checkpoint = spec.checkpoint
    if checkpoint.volume_claim is not None:
        report("spec.checkpoint.volumeClaim", object_name("PersistentVolumeClaim", checkpoint.volume_claim))
    if checkpoint.credentials_secret is not None:
        report("spec.checkpoint.credentialsSecret", object_name("Secret", checkpoint.credentials_secret))
    scheduling = spec.scheduling
    if scheduling.service_account_name is not None:
        report("spec.scheduling.serviceAccountName", object_name("ServiceAccount", scheduling.service_account_name))
    if scheduling.priority_class_name is not None:
        report("spec.scheduling.priorityClassName", object_name("PriorityClass", scheduling.priority_class_name))
    for index, secret in enumerate(scheduling.image_pull_secrets or ()):
        report(f"spec.scheduling.imagePullSecrets[{index}]", object_name("Secret", secret))
    for key, value in (scheduling.node_selector or {}).items():
        where = f"spec.scheduling.nodeSelector.{key}"
        report(where, qualified_name(key) or label_value(value))
    resources = [("spec.resources", spec.resources)] + [
        (f"spec.phases[{i}].resources", p.resources) for i, p in enumerate(spec.phases) if p.resources is not None
    ]
    for path, amounts in resources:
        check_resources(amounts, path, problems)


def check_resources(resources, path: str, problems: list) -> None:
    """spec.resources (or a phase's): the pod amounts and the GPU resource name."""
    for attribute, key in (("cpu", "cpu"), ("memory", "memory"), ("shared_memory", "sharedMemory")):
        value = getattr(resources, attribute)
        if value is not None:
            message = quantity(value, positive=True)
            if message:
                problems.append(Problem(f"{path}.{key}", message))
    message = resource_name(resources.gpu_resource)
    if message:
        problems.append(Problem(f"{path}.gpuResource", message, "e.g. nvidia.com/gpu or amd.com/gpu"))


def check_labels(labels: dict[str, str], path: str, problems: list) -> None:
    for key, value in labels.items():
        message = qualified_name(key) or label_value(value)
        if message:
            problems.append(Problem(f"{path}.{key}", message))


def check_annotations(annotations: dict[str, str], path: str, problems: list) -> None:
    for key in annotations:
        message = qualified_name(key)
        if message:
            problems.append(Problem(f"{path}.{key}", message))
    message = annotations_size(annotations)
    if message:
        problems.append(Problem(path, message, "keep large data in a ConfigMap or a file"))
