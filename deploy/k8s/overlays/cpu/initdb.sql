-- One database per service, owned by the lorafleet role: the registry's and the
-- scheduler's tables never share a schema, and either can move to its own server.
-- Run once by the postgres image on an empty data directory (compose mounts this
-- file; deploy/k8s/overlays/cpu/initdb.sql is a copy, because kustomize reads no
-- file outside its folder, and a unit test keeps the two equal).
CREATE DATABASE lorafleet_registry OWNER lorafleet;
CREATE DATABASE lorafleet_scheduler OWNER lorafleet;
