{{/* Common names and labels (medseg.platform.kube.Release derives the same names). */}}
{{- define "medseg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "medseg.fullname" -}}
{{- $name := include "medseg.name" . -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The chart's labels, then commonLabels (which cannot replace them). */}}
{{- define "medseg.labels" -}}
app.kubernetes.io/name: {{ include "medseg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: medseg
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with omit .Values.commonLabels "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/version" "app.kubernetes.io/managed-by" "app.kubernetes.io/part-of" "app.kubernetes.io/component" "helm.sh/chart" }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* commonAnnotations as an object's metadata.annotations (nothing when there are none). */}}
{{- define "medseg.annotations" -}}
{{- with .Values.commonAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}

{{- define "medseg.minio.selector" -}}
app.kubernetes.io/name: {{ include "medseg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: minio
{{- end -}}

{{/* The predictor's pods, by the labels KServe gives them (PodDisruptionBudget, topology spread). */}}
{{- define "medseg.predictor.selector" -}}
serving.kserve.io/inferenceservice: {{ .Values.inferenceService.name }}
component: predictor
{{- end -}}

{{/* ServiceAccounts: named after the release unless set (medseg.platform.kube.Release derives the same). */}}
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


{{/*
Pull secret names of a pod, as a JSON list: imagePullSecrets, then each image's pullSecrets.
Usage: include "medseg.pullSecretNames" (dict "images" (list .Values.image) "context" $)
*/}}
{{- define "medseg.pullSecretNames" -}}
{{- $names := list -}}
{{- range .context.Values.imagePullSecrets }}{{ $names = append $names . }}{{ end -}}
{{- range .images }}{{ range .pullSecrets }}{{ $names = append $names . }}{{ end }}{{ end -}}
{{- $names | uniq | toJson -}}
{{- end -}}

{{/*
A placement block as medseg.core.settings.Placement reads it (JSON, MEDSEG_PLACEMENT__* in the ConfigMap).
Usage: include "medseg.placement.json" (dict "block" .Values.training "images" (list .Values.image) "context" $)
*/}}
{{- define "medseg.placement.json" -}}
{{- $b := .block -}}
{{- $out := dict "nodeSelector" ($b.nodeSelector | default dict) "tolerations" ($b.tolerations | default list) "affinity" ($b.affinity | default dict) "priorityClassName" ($b.priorityClassName | default "") "topologySpreadConstraints" ($b.topologySpreadConstraints | default list) -}}
{{- $_ := set $out "imagePullSecrets" (include "medseg.pullSecretNames" . | fromJsonArray) -}}
{{- $out | toJson -}}
{{- end -}}

{{/*
A pod spec's placement fields (nodeSelector, tolerations, affinity, priorityClassName,
topologySpreadConstraints after the workload's own `spread`, imagePullSecrets): what
medseg.platform.kube.pod_placement builds from the same block.
Usage: {{- with include "medseg.podPlacement" (dict "block" .Values.minio "images" (list .Values.minio.image) "spread" list "context" $) }}{{ . | nindent 6 }}{{ end }}
*/}}
{{- define "medseg.podPlacement" -}}
{{- $b := .block -}}
{{- $out := dict -}}
{{- range $key := list "nodeSelector" "tolerations" "affinity" "priorityClassName" -}}
{{- with get $b $key }}{{ $_ := set $out $key . }}{{ end -}}
{{- end -}}
{{- with concat (.spread | default list) ($b.topologySpreadConstraints | default list) -}}
{{- $_ := set $out "topologySpreadConstraints" . -}}
{{- end -}}
{{- $secrets := list -}}
{{- range include "medseg.pullSecretNames" . | fromJsonArray }}{{ $secrets = append $secrets (dict "name" .) }}{{ end -}}
{{- with $secrets }}{{ $_ := set $out "imagePullSecrets" . }}{{ end -}}
{{- with $out }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/*
Checks across values that the schema cannot express; every failure at once, each naming its value.
*/}}
{{- define "medseg.validateValues" -}}
{{- $messages := list -}}
{{- $steps := .Values.pipeline.steps -}}
{{- range $key := list "priorityClassName" "topologySpreadConstraints" -}}
{{- if get $steps $key -}}
{{- $messages = append $messages (printf "pipeline.steps.%s: KFP cannot set it on a pipeline step (kfp-kubernetes sets nodeSelector, tolerations, affinity.nodeAffinity and imagePullSecrets); leave it empty" $key) -}}
{{- end -}}
{{- end -}}
{{- range $key, $_ := ($steps.affinity | default dict) -}}
{{- if ne $key "nodeAffinity" -}}
{{- $messages = append $messages (printf "pipeline.steps.affinity.%s: KFP sets only affinity.nodeAffinity on a pipeline step" $key) -}}
{{- end -}}
{{- end -}}
{{- $isvc := .Values.inferenceService -}}
{{- if and (gt (int $isvc.gpus) 0) (hasKey ($isvc.resources.limits | default dict) "nvidia.com/gpu") -}}
{{- $messages = append $messages "inferenceService.resources.limits.nvidia.com/gpu: set inferenceService.gpus instead (one definition of the predictor's GPUs)" -}}
{{- end -}}
{{- if $messages -}}
{{- fail (printf "\nVALUES VALIDATION:\n%s" (join "\n" $messages)) -}}
{{- end -}}
{{- end -}}
