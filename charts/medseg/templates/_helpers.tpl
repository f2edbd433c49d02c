{{/* Common names and labels. */}}
{{- define "medseg.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "medseg.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: medseg
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "medseg.minio.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: minio
{{- end -}}

{{/* The predictor's pods, by the labels KServe gives them (PodDisruptionBudget, topology spread). */}}
{{- define "medseg.predictor.selector" -}}
serving.kserve.io/inferenceservice: {{ .Values.inferenceService.name }}
component: predictor
{{- end -}}

{{/* ServiceAccounts: named after the release unless set (medseg.kube.Release derives the same). */}}
{{- define "medseg.pipeline.serviceAccountName" -}}
{{- default (printf "%s-pipeline" (include "medseg.fullname" .)) .Values.pipeline.serviceAccount -}}
{{- end -}}

{{- define "medseg.predictor.serviceAccountName" -}}
{{- default (printf "%s-predictor" (include "medseg.fullname" .)) .Values.inferenceService.serviceAccount -}}
{{- end -}}

{{/* The Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. */}}
{{- define "medseg.s3.secretName" -}}
{{- default (printf "%s-s3" (include "medseg.fullname" .)) .Values.s3.existingSecret -}}
{{- end -}}

{{- define "medseg.s3.configName" -}}
{{- printf "%s-s3" (include "medseg.fullname" .) -}}
{{- end -}}

{{/* The endpoint every client uses. */}}
{{- define "medseg.s3.endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "http://%s-minio.%s.svc:9000" (include "medseg.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "s3.endpoint is required when minio.enabled is false" .Values.s3.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "medseg.s3.useHttps" -}}
{{- if .Values.minio.enabled -}}0{{- else -}}{{ .Values.s3.useHttps }}{{- end -}}
{{- end -}}

{{- define "medseg.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end -}}

{{- define "medseg.securityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end -}}

{{/* Credentials as env, by secretKeyRef only. */}}
{{- define "medseg.s3.env" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "medseg.s3.secretName" . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "medseg.s3.secretName" . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end -}}
