{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "weir.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, the prefix of every resource name: the release
name, followed by the chart name unless the release name already contains it.
*/}}
{{- define "weir.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "weir.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of one component.
Usage: include "weir.selectorLabels" (dict "context" $ "component" "operator")
*/}}
{{- define "weir.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weir.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Common labels of one component's resources.
Usage: include "weir.labels" (dict "context" $ "component" "agent")
*/}}
{{- define "weir.labels" -}}
helm.sh/chart: {{ include "weir.chart" .context }}
{{ include "weir.selectorLabels" . }}
app.kubernetes.io/version: {{ .context.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .context.Release.Service }}
app.kubernetes.io/part-of: weir
{{- with .context.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Container image reference: registry/repository, then @digest when a digest is
given, else :tag (the chart's appVersion when the tag is empty).
Usage: include "weir.image" (dict "image" .Values.operator.image "context" $)
*/}}
{{- define "weir.image" -}}
{{- $repository := .image.repository }}
{{- if .image.registry }}
{{- $repository = printf "%s/%s" .image.registry .image.repository }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repository .image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .context.Chart.AppVersion .image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
Names of the ServiceAccounts.
*/}}
{{- define "weir.operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-operator" (include "weir.fullname" .)) .Values.serviceAccount.operator.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.operator.name }}
{{- end }}
{{- end }}

{{- define "weir.agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-agent" (include "weir.fullname" .)) .Values.serviceAccount.agent.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.agent.name }}
{{- end }}
{{- end }}

{{/*
Resources of the agent container: agent.resources, plus
"<gpuResourceName>: <gpusPerNode>" in the limits when gpusPerNode > 0.
*/}}
{{- define "weir.agent.resources" -}}
{{- $resources := deepCopy .Values.agent.resources }}
{{- $gpus := int .Values.agent.gpusPerNode }}
{{- if gt $gpus 0 }}
{{- $limits := default (dict) $resources.limits }}
{{- $_ := set $limits .Values.agent.gpuResourceName $gpus }}
{{- $_ = set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
Name of the Secret holding the agents' peer token.
*/}}
{{- define "weir.peerTokenSecret" -}}
{{- default (printf "%s-peer-token" (include "weir.fullname" .)) .Values.agent.peerToken.existingSecret -}}
{{- end }}
