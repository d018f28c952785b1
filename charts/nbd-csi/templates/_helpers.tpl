{{- /*
Names, labels and the paths and ports several objects must agree on. Every template takes them
from here, and tests/chart/ checks that the rendered objects agree.
*/ -}}

{{- /* The CSI driver name: compiled into the plugin (docs/csi-driver.md), not a value. */ -}}
{{- define "nbd-csi.driverName" -}}nbd.csi.dev{{- end }}

{{- define "nbd-csi.fullname" -}}
{{- if contains "nbd-csi" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-nbd-csi" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{- define "nbd-csi.controller.name" -}}{{ include "nbd-csi.fullname" . }}-controller{{- end }}
{{- define "nbd-csi.node.name" -}}{{ include "nbd-csi.fullname" . }}-node{{- end }}
{{- define "nbd-csi.storageNode.name" -}}{{ include "nbd-csi.fullname" . }}-storage-node{{- end }}

{{- /* The labels that make a node a storage node (storageNode.nodeSelector, or the default). */ -}}
{{- define "nbd-csi.storageNodeSelector" -}}
{{- .Values.storageNode.nodeSelector | default (dict "nbd.csi.dev/storage-node" "true") | toYaml -}}
{{- end }}

{{- define "nbd-csi.apiTokenSecret" -}}
{{- .Values.apiToken.existingSecret | default (printf "%s-api-token" (include "nbd-csi.fullname" .)) -}}
{{- end }}

{{- define "nbd-csi.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end }}

{{- /* Paths on the host, all from kubeletDir. */ -}}
{{- define "nbd-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) (include "nbd-csi.driverName" .) -}}
{{- end }}
{{- define "nbd-csi.registrationDir" -}}
{{- printf "%s/plugins_registry" (trimSuffix "/" .Values.kubeletDir) -}}
{{- end }}

{{- /* Paths inside the containers. */ -}}
{{- define "nbd-csi.socketDir" -}}/csi{{- end }}
{{- define "nbd-csi.socketPath" -}}{{ include "nbd-csi.socketDir" . }}/csi.sock{{- end }}
{{- define "nbd-csi.tokenDir" -}}/etc/nbd-csi/token{{- end }}
{{- define "nbd-csi.tlsDir" -}}/etc/nbd-csi/tls{{- end }}

{{- define "nbd-csi.labels" -}}
app.kubernetes.io/name: nbd-csi
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
{{- end }}

{{- /* Selector labels of one component: (dict "ctx" $ "component" "controller"). */ -}}
{{- define "nbd-csi.selectorLabels" -}}
app.kubernetes.io/name: nbd-csi
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "nbd-csi.componentLabels" -}}
{{ include "nbd-csi.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
