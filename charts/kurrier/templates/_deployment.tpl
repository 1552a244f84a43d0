{{/*
One Deployment of the kurrier image. Called with a dict:
  root        the chart's root context
  component   ingress | queue | delivery | operator | sink
  values      the component's values
  args        the container args (a list; the image's ENTRYPOINT is `kurrier`)
  env         extra env entries (YAML string)
  ports       container ports (YAML string)
  probes      startupProbe/readinessProbe/livenessProbe (YAML string)
  volumes     extra volumes (YAML string)
  mounts      extra volumeMounts (YAML string)
  apiAccess   mount the ServiceAccount token (operator only)
  autoscaled  leave replicas to the HorizontalPodAutoscaler
  noCommonEnv leave out the shared kurrier env (the dev sink)
  noMetrics   the container serves no metrics (no Prometheus annotations)
  serviceAccountName  override the component's ServiceAccount name
  tableKeys   the readers whose routing table keys it mounts (KURRIER_TABLE_KEYS)
*/}}
{{- define "kurrier.deployment" -}}
{{- $root := .root -}}
{{- $component := .component -}}
{{- $values := .values -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "kurrier.componentName" (list $root $component) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "kurrier.labels" (list $root $component) | nindent 4 }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ $values.replicas | default 1 }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "kurrier.selectorLabels" (list $root $component) | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  template:
    metadata:
      labels:
        {{- include "kurrier.labels" (list $root $component) | nindent 8 }}
        {{- with $values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        kubectl.kubernetes.io/default-container: {{ $component }}
        {{- if and (not .noCommonEnv) (include "kurrier.nats.auth" $root) }}
        {{- /* A new password (rotation) restarts the pods. */}}
        checksum/nats-password: {{ get (include "kurrier.nats.passwords" $root | fromJson) $component | sha256sum | trunc 16 | quote }}
        {{- end }}
        {{- if and $root.Values.metrics.podAnnotations (not .noMetrics) }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $root.Values.metrics.port | quote }}
        prometheus.io/path: /metrics
        {{- end }}
        {{- with $values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- if .serviceAccountName }}
      serviceAccountName: {{ .serviceAccountName }}
      {{- else }}
      serviceAccountName: {{ include "kurrier.serviceAccountName" (list $root $component) }}
      {{- end }}
      automountServiceAccountToken: {{ .apiAccess | default false }}
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds | default 30 }}
      {{- with $values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (include "kurrier.affinity" (list $root $component $values)) }}
      affinity:
        {{- . | nindent 8 }}
      {{- end }}
      {{- with $values.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $component }}
          image: {{ include "kurrier.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            {{- toYaml .args | nindent 12 }}
          {{- $env := "" }}
          {{- if not .noCommonEnv }}
          {{- $env = include "kurrier.commonEnv" (list $root $component) }}
          {{- end }}
          {{- with .env }}
          {{- $env = printf "%s\n%s" $env . }}
          {{- end }}
          {{- if .tableKeys }}
          {{- $env = printf "%s\n- name: KURRIER_TABLE_KEYS\n  value: /etc/kurrier/table-keys" $env }}
          {{- end }}
          {{- with $values.extraEnv }}
          {{- $env = printf "%s\n%s" $env (toYaml .) }}
          {{- end }}
          {{- with trim $env }}
          env:
            {{- . | nindent 12 }}
          {{- end }}
          ports:
            {{- with .ports }}
            {{- . | nindent 12 }}
            {{- end }}
          {{- with .probes }}
          {{- . | nindent 10 }}
          {{- end }}
          resources:
            {{- toYaml $values.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if $root.Values.nats.external.credentials.secretName }}
            - name: nats-credentials
              mountPath: /etc/kurrier/nats
              readOnly: true
            {{- end }}
            {{- if .tableKeys }}
            - name: table-keys
              mountPath: /etc/kurrier/table-keys
              readOnly: true
            {{- end }}
            {{- if and (not .noCommonEnv) (include "kurrier.nats.auth" $root) }}
            - name: nats-password
              mountPath: /etc/kurrier/nats-auth
              readOnly: true
            {{- end }}
            {{- if and (not .noCommonEnv) (include "kurrier.nats.clientCA" $root) }}
            - name: nats-ca
              mountPath: /etc/kurrier/nats-tls
              readOnly: true
            {{- end }}
            {{- with .mounts }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            {{- with $values.tmpSizeLimit }}
            sizeLimit: {{ . }}
            {{- end }}
        {{- with $root.Values.nats.external.credentials.secretName }}
        - name: nats-credentials
          secret:
            secretName: {{ . }}
            defaultMode: 0440
            items:
              - key: {{ $root.Values.nats.external.credentials.key }}
                path: {{ $root.Values.nats.external.credentials.key }}
        {{- end }}
        {{- with .tableKeys }}
        - name: table-keys
          secret:
            secretName: {{ include "kurrier.tableKeys.secretName" $root }}
            defaultMode: 0440
            items:
              {{- range . }}
              - key: {{ . }}.key
                path: {{ . }}.key
              {{- end }}
        {{- end }}
        {{- if and (not .noCommonEnv) (include "kurrier.nats.auth" $root) }}
        - name: nats-password
          secret:
            secretName: {{ include "kurrier.nats.authSecretName" $root }}
            defaultMode: 0440
            items:
              - key: {{ $component }}
                path: password
        {{- end }}
        {{- if and (not .noCommonEnv) (include "kurrier.nats.tls" $root) }}
        - name: nats-ca
          secret:
            secretName: {{ include "kurrier.nats.tlsSecretName" $root }}
            defaultMode: 0440
            items:
              - key: ca.crt
                path: ca.crt
        {{- else if and (not .noCommonEnv) (include "kurrier.nats.clientCA" $root) }}
        - name: nats-ca
          secret:
            secretName: {{ $root.Values.nats.external.tls.caSecretName }}
            defaultMode: 0440
            items:
              - key: {{ $root.Values.nats.external.tls.key }}
                path: ca.crt
        {{- end }}
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
{{- end -}}

{{/* Standard HTTP /healthz probes on the metrics port. */}}
{{- define "kurrier.httpProbes" -}}
{{- $probes := . -}}
startupProbe:
  httpGet:
    path: /healthz
    port: metrics
  {{- include "kurrier.probeTiming" $probes.startup | trim | nindent 2 }}
readinessProbe:
  httpGet:
    path: /healthz
    port: metrics
  {{- include "kurrier.probeTiming" $probes.readiness | trim | nindent 2 }}
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  {{- include "kurrier.probeTiming" $probes.liveness | trim | nindent 2 }}
{{- end -}}

{{/* A ServiceAccount for one component. */}}
{{- define "kurrier.serviceAccount" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $values := index $root.Values $component -}}
{{- $apiAccess := index . 2 -}}
{{- if $values.serviceAccount.create }}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "kurrier.serviceAccountName" (list $root $component) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "kurrier.labels" (list $root $component) | nindent 4 }}
  {{- with $values.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: {{ $apiAccess }}
{{- end }}
{{- end -}}
