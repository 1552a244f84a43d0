{{/*
Names, labels and the pieces every kurrier component shares.
*/}}

{{- define "kurrier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kurrier.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>", kept within the 63 characters of a DNS label. */}}
{{- define "kurrier.componentName" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- printf "%s-%s" (include "kurrier.fullname" $root | trunc (int (sub 62 (len $component)))) $component | trimSuffix "-" -}}
{{- end -}}

{{- define "kurrier.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; `component` may be empty. */}}
{{- define "kurrier.labels" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
helm.sh/chart: {{ include "kurrier.chart" $root }}
{{ include "kurrier.selectorLabels" (list $root $component) }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: kurrier
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kurrier.selectorLabels" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
app.kubernetes.io/name: {{ include "kurrier.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
{{- if $component }}
app.kubernetes.io/component: {{ $component }}
{{- end }}
{{- end -}}

{{- define "kurrier.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "kurrier.serviceAccountName" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $values := index $root.Values $component -}}
{{- default (include "kurrier.componentName" (list $root $component)) $values.serviceAccount.name -}}
{{- end -}}

{{/* NATS: bundled unless nats.external.url is set. */}}
{{- define "kurrier.nats.bundled" -}}
{{- if not .Values.nats.external.url -}}true{{- end -}}
{{- end -}}

{{- define "kurrier.nats.name" -}}
{{- include "kurrier.componentName" (list . "nats") -}}
{{- end -}}

{{- define "kurrier.nats.headlessName" -}}
{{- include "kurrier.componentName" (list . "nats-headless") -}}
{{- end -}}

{{- define "kurrier.nats.url" -}}
{{- if .Values.nats.external.url -}}
{{- .Values.nats.external.url -}}
{{- else -}}
{{- /* tls://: the client insists on TLS, so no server can ask for the password in the clear. */ -}}
{{- printf "%s://%s:4222" (ternary "tls" "nats" (eq (include "kurrier.nats.tls" .) "true")) (include "kurrier.nats.name" .) -}}
{{- end -}}
{{- end -}}

{{/* Replicas of kurrier's streams, KV buckets and object store. */}}
{{- define "kurrier.nats.streamReplicas" -}}
{{- if .Values.nats.external.url -}}
{{- .Values.nats.external.streamReplicas -}}
{{- else if gt (int .Values.nats.replicas) 1 -}}
3
{{- else -}}
1
{{- end -}}
{{- end -}}

{{- define "kurrier.tls.secretName" -}}
{{- if .Values.ingress.tls.existingSecret -}}
{{- .Values.ingress.tls.existingSecret -}}
{{- else -}}
{{- include "kurrier.componentName" (list . "ingress-tls") -}}
{{- end -}}
{{- end -}}

{{/* gRPC mutual TLS: where the certificates come from, certManager or chart ("" when off). */}}
{{- define "kurrier.grpcTls.source" -}}
{{- if .Values.queue.mtls.enabled -}}
{{- include "kurrier.certificateSource" (list . .Values.queue.mtls.certificates) -}}
{{- end -}}
{{- end -}}

{{/* Where certificates come from for a `certificates` value (auto | certManager | chart):
auto is cert-manager when the cluster serves it. */}}
{{- define "kurrier.certificateSource" -}}
{{- $root := index . 0 -}}
{{- $setting := index . 1 -}}
{{- if ne $setting "auto" -}}
{{- $setting -}}
{{- else if $root.Capabilities.APIVersions.Has "cert-manager.io/v1/Certificate" -}}
certManager
{{- else -}}
chart
{{- end -}}
{{- end -}}

{{/* The Secret holding one gRPC party's certificate (tls.crt, tls.key, ca.crt): queue | ingress | queue-admin. */}}
{{- define "kurrier.grpcTls.secretName" -}}
{{- $root := index . 0 -}}
{{- $party := index . 1 -}}
{{- include "kurrier.componentName" (list $root (printf "%s-grpc-tls" $party)) -}}
{{- end -}}

{{- define "kurrier.tableKeys.secretName" -}}
{{- include "kurrier.componentName" (list . "table-keys") -}}
{{- end -}}

{{/* Where a pod mounts its gRPC certificate Secret. */}}
{{- define "kurrier.grpcTls.dir" -}}/etc/kurrier/grpc-tls{{- end -}}

{{/*
Checks that a schema cannot express (they involve more than one value).
Included by templates/validate.yaml, so `helm template` and `helm install` fail early.
*/}}
{{- define "kurrier.validate" -}}
{{- $tls := .Values.ingress.tls -}}
{{- if and $tls.enabled (not $tls.existingSecret) (not $tls.certManager.enabled) -}}
{{- fail "ingress.tls.enabled needs a certificate: set ingress.tls.existingSecret to a kubernetes.io/tls Secret, or ingress.tls.certManager.enabled=true" -}}
{{- end -}}
{{- if and $tls.enabled $tls.existingSecret $tls.certManager.enabled -}}
{{- fail "ingress.tls: set either existingSecret or certManager.enabled, not both" -}}
{{- end -}}
{{- if and $tls.enabled $tls.certManager.enabled (not $tls.certManager.issuerRef.name) -}}
{{- fail "ingress.tls.certManager.enabled needs ingress.tls.certManager.issuerRef.name" -}}
{{- end -}}
{{- if and $tls.enabled $tls.certManager.enabled (not $tls.certManager.dnsNames) (not .Values.hostname) -}}
{{- fail "ingress.tls.certManager needs ingress.tls.certManager.dnsNames or hostname" -}}
{{- end -}}
{{- if and .Values.ingress.ports.smtps.enabled (not $tls.enabled) -}}
{{- fail "ingress.ports.smtps.enabled (implicit TLS, port 465) needs ingress.tls.enabled" -}}
{{- end -}}
{{- $p := .Values.ingress.ports -}}
{{- if not (or $p.smtp.enabled $p.submission.enabled $p.smtps.enabled) -}}
{{- fail "ingress.ports: enable at least one of smtp, submission, smtps" -}}
{{- end -}}
{{- if and (ne .Values.ingress.service.externalTrafficPolicy "Cluster") (eq .Values.ingress.service.type "ClusterIP") -}}
{{- fail "ingress.service.externalTrafficPolicy=Local needs ingress.service.type NodePort or LoadBalancer" -}}
{{- end -}}
{{- if and .Values.nats.external.credentials.secretName (not .Values.nats.external.url) -}}
{{- fail "nats.external.credentials.secretName is only used with nats.external.url" -}}
{{- end -}}
{{- if and .Values.nats.external.tls.caSecretName (not .Values.nats.external.url) -}}
{{- fail "nats.external.tls.caSecretName is only used with nats.external.url" -}}
{{- end -}}
{{- range $c := list "ingress" "delivery" -}}
{{- $a := (index $.Values $c).autoscaling -}}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling.minReplicas (%v) is greater than maxReplicas (%v)" $c $a.minReplicas $a.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Probe timing from values ({periodSeconds, timeoutSeconds, failureThreshold, ...}). */}}
{{- define "kurrier.probeTiming" -}}
{{- range $k, $v := . }}
{{ $k }}: {{ $v }}
{{- end }}
{{- end -}}

{{/* podAntiAffinity preset (soft | hard | none) for one component's selector labels. */}}
{{- define "kurrier.affinity" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $values := index . 2 -}}
{{- if $values.affinity -}}
{{ toYaml $values.affinity }}
{{- else if eq $values.podAntiAffinity "soft" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "kurrier.selectorLabels" (list $root $component) | nindent 12 }}
{{- else if eq $values.podAntiAffinity "hard" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "kurrier.selectorLabels" (list $root $component) | nindent 10 }}
{{- end -}}
{{- end -}}

{{/* Environment shared by every kurrier service container. */}}
{{- define "kurrier.commonEnv" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: KURRIER_NATS_URL
  value: {{ include "kurrier.nats.url" $root | quote }}
- name: KURRIER_NATS_REPLICAS
  value: {{ include "kurrier.nats.streamReplicas" $root | quote }}
{{- if $root.Values.nats.external.credentials.secretName }}
- name: KURRIER_NATS_CREDS
  value: /etc/kurrier/nats/{{ $root.Values.nats.external.credentials.key }}
{{- end }}
{{- if include "kurrier.nats.auth" $root }}
- name: KURRIER_NATS_USER
  value: {{ $component }}
- name: KURRIER_NATS_PASSWORD_FILE
  value: /etc/kurrier/nats-auth/password
{{- end }}
{{- if include "kurrier.nats.clientCA" $root }}
- name: KURRIER_NATS_TLS_CA
  value: /etc/kurrier/nats-tls/ca.crt
{{- end }}
{{- with $root.Values.hostname }}
- name: KURRIER_HOSTNAME
  value: {{ . | quote }}
{{- end }}
- name: KURRIER_LOG_LEVEL
  value: {{ $root.Values.logLevel | quote }}
- name: KURRIER_METRICS_LISTEN
  value: {{ printf "0.0.0.0:%v" $root.Values.metrics.port | quote }}
- name: OTEL_SERVICE_NAME
  value: kurrier-{{ $component }}
{{- $attrs := dict "k8s.namespace.name" "$(POD_NAMESPACE)" "k8s.pod.name" "$(POD_NAME)" "service.namespace" $root.Release.Namespace }}
{{- $attrs = merge (deepCopy $root.Values.telemetry.resourceAttributes) $attrs }}
{{- $pairs := list }}
{{- range $k := keys $attrs | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%v" $k (get $attrs $k)) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $pairs | quote }}
{{- with $root.Values.telemetry.otlp }}
{{- if .endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
{{- if .protocol }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .protocol | quote }}
{{- end }}
{{- if .headers }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  value: {{ .headers | quote }}
{{- end }}
{{- else }}
- name: OTEL_SDK_DISABLED
  value: "true"
{{- end }}
{{- end }}
{{- with $root.Values.telemetry.sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- with $root.Values.telemetry.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The bundled NATS's security: one user per component with its permissions
(files/nats-permissions.json, written from kurrier.core.nats_access), and TLS.
*/}}
{{- define "kurrier.nats.auth" -}}
{{- if and (include "kurrier.nats.bundled" .) .Values.nats.auth.enabled -}}true{{- end -}}
{{- end -}}

{{- define "kurrier.nats.tls" -}}
{{- if and (include "kurrier.nats.bundled" .) .Values.nats.tls.enabled -}}true{{- end -}}
{{- end -}}

{{/* Whether a sidecar has the bundled NATS load a renewed certificate. */}}
{{- define "kurrier.nats.tlsReload" -}}
{{- if and (include "kurrier.nats.tls" .) (gt (int .Values.nats.tls.reload.intervalSeconds) 0) -}}true{{- end -}}
{{- end -}}

{{/* Whether clients get a CA to verify NATS with: the bundled NATS's, or the one given for an external NATS. */}}
{{- define "kurrier.nats.clientCA" -}}
{{- if or (include "kurrier.nats.tls" .) (and .Values.nats.external.url .Values.nats.external.tls.caSecretName) -}}true{{- end -}}
{{- end -}}

{{/* Where the NATS certificate comes from: certManager or chart ("" without TLS). */}}
{{- define "kurrier.nats.tlsSource" -}}
{{- if include "kurrier.nats.tls" . -}}
{{- include "kurrier.certificateSource" (list . .Values.nats.tls.certificates) -}}
{{- end -}}
{{- end -}}

{{- define "kurrier.nats.authSecretName" -}}
{{- include "kurrier.componentName" (list . "nats-auth") -}}
{{- end -}}

{{- define "kurrier.nats.tlsSecretName" -}}
{{- include "kurrier.componentName" (list . "nats-tls") -}}
{{- end -}}

{{/* Every component's NATS permissions, by user. */}}
{{- define "kurrier.nats.permissions" -}}
{{- .Files.Get "files/nats-permissions.json" -}}
{{- end -}}

{{/*
The users' passwords (JSON, by user): those of the existing Secret, so they
stay across upgrades, else new random ones. Made once per render and kept in
.Release, so every template that includes this sees the same passwords.
*/}}
{{- define "kurrier.nats.passwords" -}}
{{- if not (hasKey .Release "kurrierNatsPasswords") -}}
{{- $existing := (lookup "v1" "Secret" .Release.Namespace (include "kurrier.nats.authSecretName" .)).data | default dict -}}
{{- $passwords := dict -}}
{{- range $user := include "kurrier.nats.permissions" . | fromJson | keys | sortAlpha -}}
{{- $_ := set $passwords $user (get $existing $user | b64dec | default (randAlphaNum 32)) -}}
{{- end -}}
{{- $_ := set .Release "kurrierNatsPasswords" $passwords -}}
{{- end -}}
{{- .Release.kurrierNatsPasswords | toJson -}}
{{- end -}}

{{/* nats-server's authorization block: every user, its password and permissions. */}}
{{- define "kurrier.nats.authorization" -}}
{{- $passwords := include "kurrier.nats.passwords" . | fromJson -}}
authorization {
  users = [
    {{- range $user, $permissions := include "kurrier.nats.permissions" . | fromJson }}
    {
      user: {{ $user | quote }}
      password: {{ get $passwords $user | quote }}
      permissions: {
        {{- range $direction := list "publish" "subscribe" }}
        {{ $direction }}: { allow: [
          {{- range $i, $subject := (index $permissions $direction).allow }}
          {{- if $i }},{{ end }}
          {{ $subject | quote }}
          {{- end }}
        ] }
        {{- end }}
      }
    }
    {{- end }}
  ]
}
{{- end -}}

{{/* The names clients and routes reach the bundled NATS by. */}}
{{- define "kurrier.nats.dnsNames" -}}
{{- $name := include "kurrier.nats.name" . -}}
{{- $headless := include "kurrier.nats.headlessName" . -}}
{{- $names := list -}}
{{- range $host := list $name (printf "*.%s" $headless) -}}
{{- range $suffix := list "" (printf ".%s" $.Release.Namespace) (printf ".%s.svc" $.Release.Namespace) (printf ".%s.svc.cluster.local" $.Release.Namespace) -}}
{{- $names = append $names (printf "%s%s" $host $suffix) -}}
{{- end -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}
