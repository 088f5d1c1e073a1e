{{/*
Names, labels and the few values every template derives the same way. Paths inside the pods are
defined here once: the proxy settings (proxy-configmap.yaml) name files that the proxy Deployment
mounts at exactly these places.
*/}}

{{- define "mailgress.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "mailgress.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "mailgress.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Resource names; each leaves room for its suffix within the 63-character limit. */}}
{{- define "mailgress.controller.fullname" -}}
{{- printf "%s-controller" (include "mailgress.fullname" . | trunc 52 | trimSuffix "-") -}}
{{- end -}}
{{- define "mailgress.proxy.fullname" -}}
{{- printf "%s-proxy" (include "mailgress.fullname" . | trunc 57 | trimSuffix "-") -}}
{{- end -}}
{{/* The Service of the proxies' admin port that a ServiceMonitor scrapes. */}}
{{- define "mailgress.proxyAdmin.fullname" -}}
{{- printf "%s-proxy-admin" (include "mailgress.fullname" . | trunc 51 | trimSuffix "-") -}}
{{- end -}}
{{/* A cluster-scoped object's name: "<namespace>:<fullname>-<suffix>". The namespace keeps apart
releases of one name in two namespaces, and the ':' keeps apart the names a '-' would join alike
(release eu in namespace mail-prod, prod-eu in mail): no namespace name holds a ':'. RBAC names
are path segments (Kubernetes' ValidateRBACName, which Helm's lint applies too: not "." or "..",
no '/' or '%'), as in Kubernetes' own system:controller:... roles, of any length: the name is
never cut, at most 63 + 1 + 63 + 1 + 15 characters. (dict "context" $ "suffix" "controller") */}}
{{- define "mailgress.clusterName" -}}
{{- printf "%s:%s-%s" .context.Release.Namespace (include "mailgress.fullname" .context) .suffix -}}
{{- end -}}
{{/* The Secret the controller writes the routing table snapshot to (reconciler.SNAPSHOT_KEY,
or reconciler.SNAPSHOT_GZIP_KEY for a table too large to store plainly). A Secret because route
tables carry auth_http request headers, which the aggregated view role must not read. */}}
{{- define "mailgress.snapshotSecret" -}}
{{- printf "%s-routing-table" (include "mailgress.fullname" . | trunc 49 | trimSuffix "-") -}}
{{- end -}}
{{/* "true" when the release serves the MailRoutes of every namespace (watchNamespaces ["*"]). */}}
{{- define "mailgress.allNamespaces" -}}
{{- has "*" .Values.controller.watchNamespaces -}}
{{- end -}}
{{/* The namespaces whose MailRoutes the release serves, sorted, as JSON (not with ["*"]). */}}
{{- define "mailgress.servedNamespaces" -}}
{{- .Values.controller.watchNamespaces | default (list .Release.Namespace) | uniq | sortAlpha | toJson -}}
{{- end -}}
{{/* The push channel's TLS Secret: tls.crt, tls.key and ca.crt (cert-manager's layout). */}}
{{- define "mailgress.pushTlsSecret" -}}
{{- if .Values.controller.pushTls.existingSecret -}}
{{- .Values.controller.pushTls.existingSecret -}}
{{- else -}}
{{- printf "%s-push-tls" (include "mailgress.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}
{{- define "mailgress.pushTokenSecret" -}}
{{- if .Values.controller.pushToken.existingSecret -}}
{{- .Values.controller.pushToken.existingSecret -}}
{{- else -}}
{{- printf "%s-push-token" (include "mailgress.fullname" . | trunc 52 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}

{{/* Every name that comes from the values or the release (names, namespaces, Secrets, classes)
is quoted wherever the templates write it: YAML would read "123", "on" or "null" as no string. */}}
{{- define "mailgress.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "mailgress.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailgress
{{- end -}}

{{/* Selector labels of one component: (dict "context" $ "component" "proxy"). */}}
{{- define "mailgress.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailgress.name" .context | quote }}
app.kubernetes.io/instance: {{ .context.Release.Name | quote }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The live Deployment of a component (lookup, as JSON; {} when there is none, and in offline
renders: helm template, --dry-run). A Deployment's selector never changes, and nameOverride is
in it (app.kubernetes.io/name): an upgrade that would change it fails here, showing both
selectors, rather than at the API server after other objects were applied. (dict "context" $ "component"
"proxy" "name" <the Deployment's name>) */}}
{{- define "mailgress.liveDeployment" -}}
{{- $live := lookup "apps/v1" "Deployment" .context.Release.Namespace .name -}}
{{- if $live -}}
{{- $wanted := dict "matchLabels" (include "mailgress.selectorLabels" . | fromYaml) -}}
{{- $selector := dig "spec" "selector" dict $live -}}
{{- if ne (toJson $selector) (toJson $wanted) -}}
{{- fail (printf "nameOverride is fixed at install: the Deployment %s selects %s, and Kubernetes never changes a Deployment's selector, but these values would make it select %s. Keep the nameOverride the release was installed with, or uninstall and install again" .name (toJson (dig "matchLabels" dict $selector)) (toJson $wanted.matchLabels)) -}}
{{- end -}}
{{- end -}}
{{- toJson ($live | default dict) -}}
{{- end -}}

{{/* The controller finds this release's proxy pods by these labels (--proxy-selector). */}}
{{- define "mailgress.proxySelector" -}}
{{- $labels := include "mailgress.selectorLabels" (dict "context" . "component" "proxy") | fromYaml -}}
{{- $terms := list -}}
{{- range $key := keys $labels | sortAlpha -}}
{{- $terms = append $terms (printf "%s=%s" $key (get $labels $key)) -}}
{{- end -}}
{{- join "," $terms -}}
{{- end -}}

{{- define "mailgress.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The controller Service's name as proxies reach it, which its certificate must carry. */}}
{{- define "mailgress.controllerHost" -}}
{{- printf "%s.%s.svc" (include "mailgress.controller.fullname" .) .Release.Namespace -}}
{{- end -}}
{{/* Every DNS name of the controller Service, as a JSON list: what its certificate carries. */}}
{{- define "mailgress.controllerDnsNames" -}}
{{- $service := include "mailgress.controller.fullname" . -}}
{{- $namespaced := printf "%s.%s" $service .Release.Namespace -}}
{{- list $service $namespaced (printf "%s.svc" $namespaced) (printf "%s.svc.cluster.local" $namespaced) | toJson -}}
{{- end -}}

{{/* The push channel URL proxies connect to (the controller Service). */}}
{{- define "mailgress.controllerUrl" -}}
{{- printf "%s://%s:%d" (ternary "https" "http" .Values.controller.pushTls.enabled) (include "mailgress.controllerHost" .) (int .Values.controller.pushPort) -}}
{{- end -}}

{{/* Paths inside the pods. The proxy reads its files through the volumes' symbolic links
(never resolved), so a renewed Secret or ConfigMap reaches it. */}}
{{- define "mailgress.settingsDir" -}}/etc/mailgress/settings{{- end -}}
{{- define "mailgress.tokenDir" -}}/etc/mailgress/push-token{{- end -}}
{{- define "mailgress.pushTlsDir" -}}/etc/mailgress/push-tls{{- end -}}
{{- define "mailgress.pushCaDir" -}}/etc/mailgress/push-ca{{- end -}}
{{- define "mailgress.snapshotDir" -}}/etc/mailgress/snapshot{{- end -}}
{{- define "mailgress.tlsDir" -}}/etc/mailgress/tls{{- end -}}
{{- define "mailgress.backendCaDir" -}}/etc/mailgress/backend-ca{{- end -}}

{{/* Every TLS Secret the listeners name, each once, in order of first use. */}}
{{- define "mailgress.tlsSecrets" -}}
{{- $names := list -}}
{{- range .Values.proxy.listeners -}}
{{- range (.certificates | default list) -}}
{{- $names = append $names . -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "names" ($names | uniq)) -}}
{{- end -}}

{{/* The controller's ports are distinct: it binds each of them (pushPort: the push channel and
/metrics; healthPort: kopf's liveness endpoint), and two on one port end it with EADDRINUSE.
values.schema.json cannot say so: JSON Schema compares no two values. */}}
{{- define "mailgress.checkControllerPorts" -}}
{{- $taken := dict -}}
{{- range $key := list "pushPort" "healthPort" -}}
{{- $port := toString (int (index $.Values.controller $key)) -}}
{{- with index $taken $port -}}
{{- fail (printf "controller.%s and controller.%s are both %s: the controller binds each, so each needs a port of its own" . $key $port) -}}
{{- end -}}
{{- $_ := set $taken $port $key -}}
{{- end -}}
{{- end -}}

{{/* The preStop sleep counts against the grace period: one at least as long leaves the proxy no
time to drain, and the kubelet kills it during the sleep. values.schema.json cannot compare them. */}}
{{- define "mailgress.checkGracePeriod" -}}
{{- $sleep := int .Values.proxy.preStopSleepSeconds -}}
{{- $grace := int .Values.proxy.terminationGracePeriodSeconds -}}
{{- if ge $sleep $grace -}}
{{- fail (printf "proxy.preStopSleepSeconds (%d) must be shorter than proxy.terminationGracePeriodSeconds (%d): the grace period counts from the start of the sleep, and the kubelet kills the pod when it ends" $sleep $grace) -}}
{{- end -}}
{{- end -}}

{{/* Listener names (admin is the admin port's), container ports and Service ports are unique. */}}
{{- define "mailgress.checkListeners" -}}
{{- $names := list -}}
{{- $ports := list (int .Values.proxy.adminPort) -}}
{{- $servicePorts := list -}}
{{- range .Values.proxy.listeners -}}
{{- if eq .name "admin" -}}
{{- fail "proxy.listeners: the name admin is taken by the admin port (metrics, probes)" -}}
{{- end -}}
{{- if has .name $names -}}
{{- fail (printf "proxy.listeners: the name %q is used twice" .name) -}}
{{- end -}}
{{- if has (int .containerPort) $ports -}}
{{- fail (printf "proxy.listeners[%s]: containerPort %d is already taken (another listener or proxy.adminPort)" .name (int .containerPort)) -}}
{{- end -}}
{{- if has (int .port) $servicePorts -}}
{{- fail (printf "proxy.listeners[%s]: Service port %d is used twice" .name (int .port)) -}}
{{- end -}}
{{- $names = append $names .name -}}
{{- $servicePorts = append $servicePorts (int .port) -}}
{{- $ports = append $ports (int .containerPort) -}}
{{- end -}}
{{- end -}}
