{{/* Names, labels and the member list shared by the templates. */}}

{{- define "junction.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The StatefulSet's name. Pod names are <fullname>-<ordinal> and the node id is ordinal + 1, so
it must leave room for "-NN" within 63 characters.
*/}}
{{- define "junction.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "junction.headless" -}}
{{- printf "%s-headless" (include "junction.fullname" .) }}
{{- end }}

{{- define "junction.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "junction.selectorLabels" -}}
app.kubernetes.io/name: {{ include "junction.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "junction.labels" -}}
helm.sh/chart: {{ include "junction.chart" . }}
{{ include "junction.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: junction
{{- end }}

{{- define "junction.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "junction.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "junction.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The DNS name of pod <ordinal> through the headless Service. */}}
{{- define "junction.podHost" -}}
{{- $ := index . 0 }}
{{- $ordinal := index . 1 }}
{{- printf "%s-%d.%s.%s.svc.%s" (include "junction.fullname" $) (int $ordinal) (include "junction.headless" $) $.Release.Namespace $.Values.clusterDomain }}
{{- end }}

{{/*
The initial member list: node (ordinal + 1) at its pod's stable DNS name, for every replica.
*/}}
{{- define "junction.members" -}}
{{- $members := list }}
{{- range $ordinal := until (int .Values.replicaCount) }}
{{- $members = append $members (printf "%d=%s:%d" (add1 $ordinal) (include "junction.podHost" (list $ $ordinal)) (int $.Values.ports.grpc)) }}
{{- end }}
{{- join "," $members }}
{{- end }}

{{/* The client address (the client Service) used by NOTES and the test pod. */}}
{{- define "junction.clientAddress" -}}
{{- printf "%s.%s.svc.%s:%d" (include "junction.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.ports.grpc) }}
{{- end }}

{{/*
Guard the node count of a running cluster: new pods join it (as learners, then voters), so
growing is always fine; shrinking is allowed only once every node above the new count has
been removed from the cluster (`junction cluster remove-node N --wait`, which moves its
replicas away first) and the upgrade says so in scaleDown.removedNodes. Dropping pods that are
still members would lose replicas and, with two of five, the metadata quorum. lookup sees the
live StatefulSet during install/upgrade; it returns nothing in `helm template` and dry runs,
where there is no cluster to protect.
*/}}
{{- define "junction.guardReplicaChange" -}}
{{- $live := lookup "apps/v1" "StatefulSet" .Release.Namespace (include "junction.fullname" .) }}
{{- if and $live $live.spec }}
{{- $current := int (default 0 $live.spec.replicas) }}
{{- $want := int .Values.replicaCount }}
{{- if and (gt $current 0) (lt $want $current) }}
{{- $removed := list }}
{{- range (.Values.scaleDown.removedNodes | default list) }}
{{- $removed = append $removed (int .) }}
{{- end }}
{{- $missing := list }}
{{- range $id := untilStep (int (add $want 1)) (int (add $current 1)) 1 }}
{{- if not (has (int $id) $removed) }}
{{- $missing = append $missing (int $id) }}
{{- end }}
{{- end }}
{{- if $missing }}
{{- fail (printf "replicaCount %d is below the running cluster's %d: nodes %s must leave the cluster first. Run `junction cluster remove-node N --wait` for each (it moves the node's replicas to the others, then takes it out of the metadata group), then upgrade with --set scaleDown.removedNodes='{%s}' (README: Deploy on Kubernetes, Scaling)." $want $current (join "," $missing) (join "," $missing)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret holding the nodes' shared node-to-node secret. */}}
{{- define "junction.clusterSecretName" -}}
{{- default (printf "%s-cluster-secret" (include "junction.fullname" .)) .Values.clusterSecret.existingSecret }}
{{- end }}

{{/* The Secret holding the bootstrap admin token. */}}
{{- define "junction.adminTokenName" -}}
{{- default (printf "%s-admin-token" (include "junction.fullname" .)) .Values.auth.adminToken.existingSecret }}
{{- end }}

{{/* The Secret holding the nodes' TLS certificate, key and CA (tls.crt, tls.key, ca.crt). */}}
{{- define "junction.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "junction.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/*
The names the node certificate must hold: every pod through the headless Service (a wildcard),
the client Service in its short and long forms, and localhost/127.0.0.1 for `kubectl exec`.
*/}}
{{- define "junction.tlsDnsNames" -}}
{{- $ns := .Release.Namespace }}
{{- $domain := .Values.clusterDomain }}
{{- $full := include "junction.fullname" . }}
{{- $headless := include "junction.headless" . }}
{{- list (printf "*.%s.%s.svc.%s" $headless $ns $domain) (printf "*.%s.%s.svc" $headless $ns) (printf "%s.%s.svc.%s" $full $ns $domain) (printf "%s.%s.svc" $full $ns) (printf "%s.%s" $full $ns) $full "localhost" | toJson }}
{{- end }}
