{{/* The labels that pick this release's pod: with the release in them, two releases in
one namespace never route to each other's server (each has its own store). */}}
{{- define "explaind.selectorLabels" -}}
{app.kubernetes.io/name: explaind, app.kubernetes.io/instance: {{ .Release.Name | quote }}}
{{- end }}
