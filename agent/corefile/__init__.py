"""The Corefile: one lexer (``lexer``) and the server-block parse on it (``parse``), which every edit
(``splice``) goes through; rendering from the template and the kube-dns ConfigMap (``render``,
``kubedns``); gathering the inputs (``inputs``); where CoreDNS answers the probes (``endpoints``);
writing the file (``files``)."""
