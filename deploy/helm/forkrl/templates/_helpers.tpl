{{/* Names: <release>-forkrl unless the release name already says forkrl; 40 characters leave room
     for KubeRay's suffixes (-head-svc, -<group>-worker-xxxxx) within the 63-character label limit. */}}
{{- define "forkrl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "forkrl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "forkrl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "forkrl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every pod of the release, the Ray pods included. The Ray pod templates carry no
     app.kubernetes.io/* label: KubeRay < 1.2 copies a Ray pod's labels onto the head Service and then looks
     the Service up by app.kubernetes.io/name=kuberay, so a RayJob whose pods set app.kubernetes.io/name
     never starts (kuberay #2147). */}}
{{- define "forkrl.podLabels" -}}
forkrl.io/release: {{ .Release.Name }}
{{- end -}}

{{/* The Secret holding the Ray cluster's authentication token (RAY_AUTH_MODE=token). */}}
{{- define "forkrl.rayTokenSecret" -}}
{{- printf "%s-ray-token" (include "forkrl.fullname" .) -}}
{{- end -}}

{{- define "forkrl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "forkrl.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Secret and key holding the queue password, wherever the queue lives. */}}
{{- define "forkrl.redisSecretName" -}}
{{- if not .Values.redis.enabled -}}
{{- .Values.queue.passwordSecret.name -}}
{{- else if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecret -}}
{{- else -}}
{{- printf "%s-redis" (include "forkrl.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "forkrl.redisSecretKey" -}}
{{- if not .Values.redis.enabled -}}
{{- .Values.queue.passwordSecret.key -}}
{{- else if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecretKey -}}
{{- else -}}
password
{{- end -}}
{{- end -}}

{{- define "forkrl.queueUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis.%s.svc:6379/0" (include "forkrl.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.queue.url -}}
{{- end -}}
{{- end -}}

{{/* The driver command. Overrides come after the file, so they win over anything in it. */}}
{{- define "forkrl.entrypoint" -}}
{{- $args := list "forkrl" "train" "/etc/forkrl/config.yaml" -}}
{{- $args = append $args (printf "queue.url=%s" (include "forkrl.queueUrl" .)) -}}
{{- $args = append $args "metrics.host=0.0.0.0" -}}
{{- $args = append $args (printf "metrics.port=%d" (int .Values.metrics.port)) -}}
{{- if .Values.checkpoints.enabled -}}
{{- $args = append $args (printf "run.output_dir=%s/runs" .Values.checkpoints.mountPath) -}}
{{- end -}}
{{- range .Values.forkrl.overrides -}}
{{- $args = append $args (squote .) -}}
{{- end -}}
{{- with .Values.forkrl.resume -}}
{{- $args = append $args (printf "--resume=%s" (squote .)) -}}
{{- end -}}
{{- join " " $args -}}
{{- end -}}

{{/* The config file content; refuses a password in it (ConfigMaps are not secret). */}}
{{- define "forkrl.configYaml" -}}
{{- if .Values.forkrl.configYaml -}}
{{- if regexMatch "(?m)^\\s*password\\s*:\\s*[^\\s#]" .Values.forkrl.configYaml -}}
{{- fail "forkrl.configYaml: contains a password; the queue password comes from a Secret (redis.auth / queue.passwordSecret), never from the config ConfigMap" -}}
{{- end -}}
{{- .Values.forkrl.configYaml -}}
{{- else -}}
{{- toYaml .Values.forkrl.config -}}
{{- end -}}
{{- end -}}

{{/* Ray's token authentication, for every Ray container and every `ray job submit`: the dashboard
     and job API listen on the pod network, and answer only requests that carry the token. */}}
{{- define "forkrl.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "forkrl.rayTokenSecret" . }}
      key: token
{{- end -}}

{{/* Environment of every Ray container: the queue password from its Secret, the Ray token, plus
     forkrl.env. */}}
{{- define "forkrl.env" -}}
- name: FORKRL_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "forkrl.redisSecretName" . }}
      key: {{ include "forkrl.redisSecretKey" . }}
{{ include "forkrl.rayAuthEnv" . }}
{{- with .Values.forkrl.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes of every Ray pod. */}}
{{- define "forkrl.volumes" -}}
- name: config
  configMap:
    name: {{ include "forkrl.fullname" . }}-config
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
{{- if .Values.checkpoints.enabled }}
- name: checkpoints
  persistentVolumeClaim:
    claimName: {{ .Values.checkpoints.existingClaim | default (printf "%s-checkpoints" (include "forkrl.fullname" .)) }}
{{- end }}
{{- if .Values.models.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.models.existingClaim }}
    readOnly: true
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "forkrl.volumeMounts" -}}
- name: config
  mountPath: /etc/forkrl
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- if .Values.checkpoints.enabled }}
- name: checkpoints
  mountPath: {{ .Values.checkpoints.mountPath }}
{{- end }}
{{- if .Values.models.existingClaim }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod-level fields shared by the head and worker templates. */}}
{{- define "forkrl.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- end -}}

{{/* ray start parameters as strings, the chart's defaults under the user's. */}}
{{- define "forkrl.rayStartParams" -}}
{{- $params := dict -}}
{{- range $k, $v := . -}}
{{- $_ := set $params $k (toString $v) -}}
{{- end -}}
{{- toYaml $params -}}
{{- end -}}

{{/* The RayClusterSpec shared by the RayJob and the RayCluster. */}}
{{- define "forkrl.rayClusterSpec" -}}
{{- $root := . -}}
rayVersion: {{ .Values.rayVersion | quote }}
headGroupSpec:
  rayStartParams:
    {{- include "forkrl.rayStartParams" (merge (dict) .Values.head.rayStartParams (dict "num-gpus" "0" "dashboard-host" "0.0.0.0")) | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "forkrl.podLabels" . | nindent 8 }}
        forkrl.io/component: ray-head
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- with include "forkrl.podCommon" . | trim }}{{ . | nindent 6 }}{{ end }}
      containers:
        - name: ray-head
          image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          ports:
            - {name: gcs-server, containerPort: 6379}
            - {name: dashboard, containerPort: 8265}
            - {name: client, containerPort: 10001}
            - {name: forkrl-metrics, containerPort: {{ .Values.metrics.port }}}
          env:
            {{- include "forkrl.env" . | nindent 12 }}
          resources:
            {{- toYaml .Values.head.resources | nindent 12 }}
          volumeMounts:
            {{- include "forkrl.volumeMounts" . | nindent 12 }}
      volumes:
        {{- include "forkrl.volumes" . | nindent 8 }}
      {{- with .Values.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.head.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
workerGroupSpecs:
{{- range .Values.workers }}
  - groupName: {{ .name }}
    replicas: {{ .replicas }}
    minReplicas: {{ hasKey . "minReplicas" | ternary .minReplicas .replicas }}
    maxReplicas: {{ hasKey . "maxReplicas" | ternary .maxReplicas .replicas }}
    rayStartParams:
      {{- include "forkrl.rayStartParams" (default (dict) .rayStartParams) | nindent 6 }}
    template:
      metadata:
        labels:
          {{- include "forkrl.podLabels" $root | nindent 10 }}
          forkrl.io/component: ray-worker
          {{- with $root.Values.podLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        {{- with $root.Values.podAnnotations }}
        annotations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
      spec:
        {{- with include "forkrl.podCommon" $root | trim }}{{ . | nindent 8 }}{{ end }}
        containers:
          - name: ray-worker
            image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag }}"
            imagePullPolicy: {{ $root.Values.image.pullPolicy }}
            env:
              {{- include "forkrl.env" $root | nindent 14 }}
            {{- $res := deepCopy (default (dict) .resources) }}
            {{- if gt (int .gpus) 0 }}
            {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $res.limits)) }}
            {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $res.requests)) }}
            {{- end }}
            resources:
              {{- toYaml $res | nindent 14 }}
            volumeMounts:
              {{- include "forkrl.volumeMounts" $root | nindent 14 }}
        volumes:
          {{- include "forkrl.volumes" $root | nindent 10 }}
        {{- with .nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .affinity }}
        affinity:
          {{- toYaml . | nindent 10 }}
        {{- end }}
{{- end }}
{{- end -}}
