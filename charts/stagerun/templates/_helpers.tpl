{{/*
Names and labels shared by every template.
*/}}

{{/* The chart name, or nameOverride: the app.kubernetes.io/name label. */}}
{{- define "stagerun.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The object name prefix: fullnameOverride, or "<release>-<name>" ("<release>" alone when it already contains the
name). 63 characters at most (DNS labels).
*/}}
{{- define "stagerun.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "stagerun-0.1.0": the helm.sh/chart label. */}}
{{- define "stagerun.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object the chart creates. */}}
{{- define "stagerun.labels" -}}
helm.sh/chart: {{ include "stagerun.chart" . }}
{{ include "stagerun.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stagerun
{{- end }}

{{/*
Labels selecting the operator pod. app.kubernetes.io/instance and component tell it apart from trainer pods, which
carry app.kubernetes.io/name: stagerun too (with managed-by: stagerun-operator).
*/}}
{{- define "stagerun.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stagerun.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "stagerun.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stagerun.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: set the name of an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image, "repository:tag" (tag: image.tag or the chart's appVersion). */}}
{{- define "stagerun.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
RBAC. Exactly the calls the operator makes (operator/kube.py, and kopf for watching, finalizers, its annotations and
Events). tests/test_rbac.py installs this chart with Helm into a real control plane, runs the real operator with the
chart's ServiceAccount token and reads the apiserver's audit log: RBAC allows every call, and every rule is used.

Namespaced rules: in every watched namespace (a Role each), or cluster-wide (the ClusterRole) with watchNamespaces
empty.
- trainingruns: kopf lists and watches them, patches finalizers and its annotations; the operator reads one fresh
  before each reconcile (get).
- trainingruns/status: the operator merge-patches status (with the resourceVersion it read).
- trainingruns/finalizers update: never called; the OwnerReferencesPermissionEnforcement admission plugin (OpenShift,
  hardened clusters) asks for it when the operator creates a child whose ownerReference to its TrainingRun sets
  blockOwnerDeletion (so that foreground deletion waits for the children). Without it every child is forbidden.
- events: kopf posts the Events of every transition (core v1 Events); while a gang is Starting the operator lists
  its Job's Events (by uid) for FailedCreate, the only place the Job controller says why it has no pods.
- configmaps, services, jobs: created per attempt, found by label (list) and deleted; the attempt's Job is read by
  name (get); a running attempt's ConfigMap is patched when later phases are edited.
- pods: listed by label (the gang's state) and deleted (teardown, force-delete of pods stuck on dead nodes).
- jobs are also watched (kopf, label selector stagerun.io/run on the server): a Job whose pod failed, or that
  ended or was suspended, reconciles its run at once.
- networkpolicies: one created per attempt (the trainer pods' ingress, operator/network_policy.py), deleted with
  the attempt, found by label (list) when the run is deleted. Granted with networkPolicy.enabled false too: the
  operator still removes the policies of runs launched while it was on.
- kopfpeerings (only with watchNamespaces set): kopf lists and watches the namespace's peering object and patches
  its keep-alive record into the status (leader election among the replicas, templates/peering.yaml).
*/}}
{{- define "stagerun.namespacedRules" -}}
- apiGroups: ["stagerun.io"]
  resources: ["trainingruns"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["stagerun.io"]
  resources: ["trainingruns/status"]
  verbs: ["patch"]
- apiGroups: ["stagerun.io"]
  resources: ["trainingruns/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "list", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "list", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "watch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "list", "delete"]
{{- if .Values.watchNamespaces }}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}

{{/*
Cluster-scoped rules (always a ClusterRole).
- customresourcedefinitions list/watch: kopf's resource scanning (it notices the TrainingRun CRD being installed or
  removed while it runs; without it kopf logs a warning and only scans at startup).
- namespaces list/watch: only with watchNamespaces set: kopf resolves and follows the namespaces it serves (without
  it kopf logs a warning and takes the names as given).
- nodes get (rbac.readNodes): readiness of the nodes that host a gang's pods (read by name, never listed).
- clusterkopfpeerings (only with watchNamespaces empty): as kopfpeerings above, for the cluster-wide peering object.
*/}}
{{- define "stagerun.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.watchNamespaces }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- if .Values.rbac.readNodes }}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get"]
{{- end }}
{{- if not .Values.watchNamespaces }}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}
