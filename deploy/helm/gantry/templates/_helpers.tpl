{{/*
Names. The full name is kept to 42 characters so that "<fullname>-controller" and the etcd
members' host names stay within the 63 characters of a DNS label.
*/}}
{{- define "gantry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 42 | trimSuffix "-" }}
{{- end }}

{{- define "gantry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gantry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries. */}}
{{- define "gantry.labels" -}}
helm.sh/chart: {{ include "gantry.chart" . }}
app.kubernetes.io/name: {{ include "gantry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gantry
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include "gantry.selectorLabels" (list $ "controller") */}}
{{- define "gantry.selectorLabels" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "gantry.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* All labels of one component's resources: include "gantry.componentLabels" (list $ "etcd") */}}
{{- define "gantry.componentLabels" -}}
{{ include "gantry.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Images. */}}
{{- define "gantry.controllerImage" -}}
{{- $repo := default .Values.image.repository .Values.controller.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.controller.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end }}

{{- define "gantry.workerImage" -}}
{{- $repo := default .Values.image.repository .Values.worker.image.repository -}}
{{- $tag := default (printf "%s-cuda" (default .Chart.AppVersion .Values.image.tag)) .Values.worker.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end }}

{{/* Service accounts. */}}
{{- define "gantry.controllerServiceAccount" -}}
{{- if .Values.serviceAccount.controller.create -}}
{{- default (printf "%s-controller" (include "gantry.fullname" .)) .Values.serviceAccount.controller.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.controller.name -}}
{{- end -}}
{{- end }}

{{- define "gantry.workerServiceAccount" -}}
{{- if .Values.serviceAccount.worker.create -}}
{{- default (printf "%s-worker" (include "gantry.fullname" .)) .Values.serviceAccount.worker.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.worker.name -}}
{{- end -}}
{{- end }}

{{/* The controller's Service: the address workers and clients dial (https with
controller.tls.enabled). */}}
{{- define "gantry.controllerUrl" -}}
{{- $scheme := ternary "https" "http" (.Values.controller.tls.enabled | default false) -}}
{{- printf "%s://%s-controller:%d" $scheme (include "gantry.fullname" .) (int .Values.controller.service.grpcPort) -}}
{{- end }}

{{/* The Secret with the controller's certificate (tls.crt, tls.key) and its CA (ca.crt). */}}
{{- define "gantry.controllerTlsSecret" -}}
{{- .Values.controller.tls.secret | default (printf "%s-controller-tls" (include "gantry.fullname" .)) -}}
{{- end }}

{{/* A controller probe: with TLS an httpGet probe asks over HTTPS. */}}
{{- define "gantry.controllerProbe" -}}
{{- $probe := deepCopy (index . 0) -}}
{{- if and (index . 1) $probe.httpGet -}}
{{- $_ := set $probe.httpGet "scheme" "HTTPS" -}}
{{- end -}}
{{- toYaml $probe -}}
{{- end }}

{{/* etcd: the headless Service's name and the client URLs the controller is given. */}}
{{- define "gantry.etcdName" -}}
{{- printf "%s-etcd" (include "gantry.fullname" .) -}}
{{- end }}

{{- define "gantry.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $name := include "gantry.etcdName" . -}}
{{- $scheme := ternary "https" "http" (not (empty (include "gantry.etcdTls" .))) -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $urls = append $urls (printf "%s://%s-%d.%s.%s.svc.%s:2379" $scheme $name $i $name $.Release.Namespace $.Values.clusterDomain) -}}
{{- end -}}
{{- join "," $urls -}}
{{- else -}}
{{- if not .Values.etcd.external.endpoints -}}
{{- fail "etcd.enabled is false: give etcd.external.endpoints (a list of etcd client URLs)" -}}
{{- end -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end }}

{{/* etcd over TLS: "true" when the controller talks TLS to etcd (the chart's etcd with
etcd.tls.enabled, or an external etcd with a clientSecret); empty otherwise. */}}
{{- define "gantry.etcdTls" -}}
{{- if .Values.etcd.enabled -}}
{{- if .Values.etcd.tls.enabled -}}
{{- if ne (empty .Values.etcd.tls.serverSecret) (empty .Values.etcd.tls.clientSecret) -}}
{{- fail "etcd.tls: give both serverSecret and clientSecret (from one CA), or neither for certificates made by the chart" -}}
{{- end -}}
true
{{- end -}}
{{- else if .Values.etcd.external.clientSecret -}}
true
{{- end -}}
{{- end }}

{{/* The Secrets holding etcd's certificates: the members' and the controller's. */}}
{{- define "gantry.etcdServerSecret" -}}
{{- .Values.etcd.tls.serverSecret | default (printf "%s-server-tls" (include "gantry.etcdName" .)) -}}
{{- end }}

{{- define "gantry.etcdClientSecret" -}}
{{- if .Values.etcd.enabled -}}
{{- .Values.etcd.tls.clientSecret | default (printf "%s-client-tls" (include "gantry.etcdName" .)) -}}
{{- else -}}
{{- .Values.etcd.external.clientSecret -}}
{{- end -}}
{{- end }}

{{/* API keys: whether they are on, and the Secret that holds them. */}}
{{- define "gantry.apiKeysEnabled" -}}
{{- if or .Values.apiKeys.create .Values.apiKeys.existingSecret .Values.apiKeys.generate -}}true{{- end -}}
{{- end }}

{{/* Whether the chart generates the keys (neither given nor named). */}}
{{- define "gantry.apiKeysGenerated" -}}
{{- if and .Values.apiKeys.generate (not .Values.apiKeys.create) (not .Values.apiKeys.existingSecret) -}}true{{- end -}}
{{- end }}

{{- define "gantry.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "gantry.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end }}

{{/* Checks of values that a schema cannot express. */}}
{{- define "gantry.checkValues" -}}
{{- if and .Values.apiKeys.create .Values.apiKeys.existingSecret -}}
{{- fail "apiKeys: set either create (with keys) or existingSecret, not both" -}}
{{- end -}}
{{- if .Values.apiKeys.create -}}
{{- if not .Values.apiKeys.keys -}}
{{- fail "apiKeys.create is true but apiKeys.keys is empty" -}}
{{- end -}}
{{- range .Values.apiKeys.keys -}}
{{- if lt (len .) 16 -}}
{{- fail "apiKeys.keys: every key needs at least 16 characters" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.etcd.enabled (eq (mod (int .Values.etcd.replicas) 2) 0) -}}
{{- fail "etcd.replicas must be odd (1, 3, 5): an even count adds no fault tolerance" -}}
{{- end -}}
{{- end }}
