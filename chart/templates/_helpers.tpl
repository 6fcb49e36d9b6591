{{/* The Corefile, the probe address and the -localip flag as the documented sed makes them. */}}

{{- define "node-local-dns.check" -}}
{{- if ne .Release.Namespace "kube-system" -}}
{{- fail (printf "node-local-dns belongs in kube-system, where the kube-dns ConfigMap and Services are (helm install -n kube-system), not %q" .Release.Namespace) -}}
{{- end -}}
{{- if not (has .Values.kubeProxyMode (list "iptables" "ipvs")) -}}
{{- fail (printf "kubeProxyMode: %q is not iptables or ipvs" .Values.kubeProxyMode) -}}
{{- end -}}
{{- if not .Values.kubeDNS.ip -}}
{{- fail "kubeDNS.ip: set it to the kube-dns Service's ClusterIP (kubectl get svc kube-dns -n kube-system -o jsonpath={.spec.clusterIP})" -}}
{{- end -}}
{{- if not (has (toString .Values.corednsInstances) (list "1" "2" "3" "4" "5" "6" "7" "8")) -}}
{{- fail (printf "corednsInstances: %v is not a number of CoreDNS processes from 1 to 8" .Values.corednsInstances) -}}
{{- end -}}
{{- end -}}

{{/* The placeholders the sed replaces, in the sed's order; the agent fills the rest at run time. */}}
{{- define "node-local-dns.substitute" -}}
{{- $v := .root.Values -}}
{{- $text := .text | replace "__PILLAR__LOCAL__DNS__" $v.localIP | replace "__PILLAR__DNS__DOMAIN__" $v.clusterDomain -}}
{{- if eq $v.kubeProxyMode "ipvs" -}}
{{- $text = $text | replace ",__PILLAR__DNS__SERVER__" "" | replace "__PILLAR__CLUSTER__DNS__" $v.kubeDNS.ip -}}
{{- else -}}
{{- $text = $text | replace "__PILLAR__DNS__SERVER__" $v.kubeDNS.ip -}}
{{- end -}}
{{- $text -}}
{{- end -}}

{{/* An IPv6 local address in brackets before ":PORT". */}}
{{- define "node-local-dns.hostport" -}}
{{- if contains ":" .Values.localIP -}}[{{ .Values.localIP }}]{{- else -}}{{ .Values.localIP }}{{- end -}}
{{- end -}}

{{- define "node-local-dns.corefile" -}}
{{- $text := .Files.Get "files/Corefile" -}}
{{- $hp := include "node-local-dns.hostport" . -}}
{{- $text = $text | replace "health __PILLAR__LOCAL__DNS__:" (printf "health %s:" $hp) | replace "ready __PILLAR__LOCAL__DNS__:" (printf "ready %s:" $hp) -}}
{{- include "node-local-dns.substitute" (dict "root" . "text" $text) -}}
{{- end -}}
