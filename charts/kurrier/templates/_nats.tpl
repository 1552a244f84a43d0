{{/* The bundled NATS server configuration (nats.conf). */}}
{{- define "kurrier.nats.config" -}}
{{- $n := .Values.nats -}}
{{- $name := include "kurrier.nats.name" . -}}
{{- $headless := include "kurrier.nats.headlessName" . -}}
{{- $replicas := int $n.replicas -}}
# Rendered by the kurrier chart. $SERVER_NAME comes from the pod name.
pid_file: /var/run/nats/nats.pid
server_name: $SERVER_NAME
listen: 0.0.0.0:4222
{{- /* The monitoring endpoints answer without a login: inside the pod unless asked. */}}
http: {{ ternary "0.0.0.0" "127.0.0.1" $n.monitoring.exposed }}:8222
max_payload: {{ $n.maxPayload }}
lame_duck_duration: 30s
lame_duck_grace_period: 10s
{{- /* One node must sync before it acknowledges: nothing else holds the write. */}}
{{- $sync := $n.jetstream.syncInterval | default (ternary "always" "" (eq $replicas 1)) }}
jetstream {
  store_dir: /data
  max_memory_store: {{ $n.jetstream.maxMemoryStore }}
  max_file_store: {{ $n.jetstream.maxFileStore }}
  {{- if $sync }}
  sync_interval: {{ $sync }}
  {{- end }}
}
{{- if include "kurrier.nats.auth" . }}
# One user per component, with its permissions (the Secret's auth.conf).
include ./auth.conf
{{- end }}
{{- $tls := include "kurrier.nats.tls" . }}
{{- if $tls }}
tls {
  cert_file: /etc/nats-tls/tls.crt
  key_file: /etc/nats-tls/tls.key
  ca_file: /etc/nats-tls/ca.crt
  timeout: 5
}
{{- end }}
{{- if gt $replicas 1 }}
cluster {
  name: {{ $n.clusterName }}
  listen: 0.0.0.0:6222
  no_advertise: true
  {{- if $tls }}
  # Routes carry every message: a server joins only with a certificate of this CA.
  tls {
    cert_file: /etc/nats-tls/tls.crt
    key_file: /etc/nats-tls/tls.key
    ca_file: /etc/nats-tls/ca.crt
    verify: true
    timeout: 5
  }
  {{- end }}
  routes: [
    {{- range $i := until $replicas }}
    nats://{{ $name }}-{{ $i }}.{{ $headless }}:6222
    {{- end }}
  ]
}
{{- end }}
{{- end -}}
