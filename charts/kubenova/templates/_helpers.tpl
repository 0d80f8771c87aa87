{{/* The standard labels (app.kubernetes.io/*) on everything the chart makes. */}}
{{- define "kubenova.labels" -}}
app.kubernetes.io/name: kubenova
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubenova
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "kubenova.selector" -}}
app.kubernetes.io/name: kubenova
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kubenova.image" -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kubenova.pullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}
