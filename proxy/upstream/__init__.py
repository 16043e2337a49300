"""The one client to the upstream FHIR server: same-origin URLs only, its own TLS and credentials."""
