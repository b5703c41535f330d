{{/* The release's resource names. */}}
{{- define "lazyblob.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lazyblob.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lazyblob.labels" -}}
{{ include "lazyblob.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "lazyblob.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* What lazyblob.toml says about the node paths, the snapshotter and metrics. */}}
{{- define "lazyblob.config" -}}
{{- $d := .Values.daemon -}}
{{- if not (has $d.runIn (list "host" "pod")) -}}
{{- fail "daemon.runIn must be host or pod" -}}
{{- end -}}
[daemon]
state_dir = "/var/lib/lazyblob"
cache_dir = "/var/cache/lazyblob"
socket = "/run/lazyblob/lazyblob.sock"
frontend = {{ $d.frontend | quote }}
cache_limit_bytes = {{ $d.cacheLimitBytes | int64 }}
restart_hold_ms = {{ $d.restartHoldMs | int64 }}

[snapshotter]
socket = "/run/lazyblob/snapshotter.sock"
root = "/var/lib/lazyblob/snapshotter"

[registry]
max_attempts = {{ .Values.registry.maxAttempts | int }}
deadline_ms = {{ .Values.registry.deadlineMs | int64 }}
{{- with .Values.registry.containerdHostsDir }}
containerd_hosts_dir = {{ . | quote }}
{{- end }}
{{- if .Values.criProxy.enabled }}

[cri]
socket = "/run/lazyblob/cri.sock"
containerd_socket = {{ .Values.criProxy.containerdSocket | quote }}
credentials_ttl_ms = {{ .Values.criProxy.credentialsTtlMs | int64 }}
{{- end }}
{{- if .Values.metrics.enabled }}

[metrics]
address = "0.0.0.0:{{ .Values.metrics.port | int }}"
{{- end }}

{{ .Values.extraConfig }}
{{- end -}}
