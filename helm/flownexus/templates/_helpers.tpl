{{- define "flownexus.name" -}}flownexus-operator{{- end -}}
{{- define "flownexus.labels" -}}
app.kubernetes.io/name: {{ include "flownexus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: flownexus
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
