#!/bin/sh
# Creates `grafana_reader`, the PostgreSQL role of Grafana's alert panels. The postgres image
# runs this once, when it initialises an empty data volume (docker-compose.yml).
#
# Grafana runs whatever SQL its users type, so this role reads no table: it may only call
# the SECURITY DEFINER functions of schema `grafana`, which return the alert columns the
# dashboard shows and nothing else (units hold webhook secrets, api_keys key hashes).
# Their bodies are checked when called, not now: `smartcover db upgrade` creates
# public.alerts later. Environment: POSTGRES_USER, POSTGRES_DB, GRAFANA_DB_PASSWORD.
set -eu

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=reader_password="$GRAFANA_DB_PASSWORD" <<'SQL'
CREATE ROLE grafana_reader LOGIN PASSWORD :'reader_password';
CREATE SCHEMA grafana;
REVOKE ALL ON SCHEMA grafana FROM PUBLIC;
GRANT USAGE ON SCHEMA grafana TO grafana_reader;

SET check_function_bodies = off;

-- Alerts raised in [from_ms, to_ms), epoch milliseconds of the raising reading.
CREATE FUNCTION grafana.alerts(from_ms bigint, to_ms bigint)
RETURNS TABLE (raised_at timestamptz, cover_id text, kind text, severity text, status text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT to_timestamp(a.raised_ms / 1000.0), a.cover_id::text, a.kind::text,
         a.severity::text, a.status::text
  FROM public.alerts AS a
  WHERE a.raised_ms >= from_ms AND a.raised_ms < to_ms
$$;

-- Alerts active now, whenever they were raised.
CREATE FUNCTION grafana.active_alerts()
RETURNS TABLE (raised_at timestamptz, cover_id text, kind text, severity text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT to_timestamp(a.raised_ms / 1000.0), a.cover_id::text, a.kind::text, a.severity::text
  FROM public.alerts AS a
  WHERE a.status = 'active'
$$;

REVOKE ALL ON FUNCTION grafana.alerts(bigint, bigint), grafana.active_alerts() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION grafana.alerts(bigint, bigint), grafana.active_alerts()
    TO grafana_reader;
SQL
