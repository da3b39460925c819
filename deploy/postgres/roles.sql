-- One Postgres role per service, each owning only its own schema (docs/operations.md, Postgres
-- roles).
--
-- Run once per database, as a superuser (on a managed Postgres, its admin user: see
-- docs/operations.md, Postgres roles), with psql: it uses psql variables and \gexec. Running it
-- again changes nothing:
--
--   psql "postgresql://postgres@db.example:5432/booking" -v ON_ERROR_STOP=1 \
--     -v orders_password="$ORDERS_DB_PASSWORD" -v payments_password="$PAYMENTS_DB_PASSWORD" \
--     -v calendar_password="$CALENDAR_DB_PASSWORD" \
--     -v notifications_password="$NOTIFICATIONS_DB_PASSWORD" \
--     -f deploy/postgres/roles.sql
--
-- Variables (all optional):
--   role_prefix             the roles are <prefix>orders, <prefix>payments, <prefix>calendar and
--                           <prefix>notifications; default booking_
--   <service>_password      that role's password; unset or empty leaves the password alone
--                           (for certificate or IAM login, or a re-run that must not change it)
--
-- What it leaves:
--   * each role can log in to this database (CONNECT) and nothing else on it: no CREATE (no new
--     schemas), no TEMPORARY; other roles lose their default CONNECT and TEMPORARY too
--   * each role owns its schema (orders, payments, calendar, notifications), so its migrations
--     create and change its tables there; no role has any right on another's schema
--   * the public schema is closed to everyone but its owner
--   * btree_gist (the orders schema's no-overlap constraint needs it) is created here, by the
--     database's owner, because a role without CREATE on the database cannot create it; the
--     orders migration's CREATE EXTENSION IF NOT EXISTS then finds it and does nothing
--   * each role's search_path in this database is its own schema only

\set ON_ERROR_STOP on
\if :{?role_prefix}
\else
\set role_prefix booking_
\endif
\if :{?orders_password}
\else
\set orders_password ''
\endif
\if :{?payments_password}
\else
\set payments_password ''
\endif
\if :{?calendar_password}
\else
\set calendar_password ''
\endif
\if :{?notifications_password}
\else
\set notifications_password ''
\endif

BEGIN;

CREATE TEMPORARY TABLE booking_services (
    schema_name text PRIMARY KEY,
    role_name text NOT NULL,
    password text NOT NULL
) ON COMMIT DROP;

INSERT INTO pg_temp.booking_services VALUES
    ('orders', :'role_prefix' || 'orders', :'orders_password'),
    ('payments', :'role_prefix' || 'payments', :'payments_password'),
    ('calendar', :'role_prefix' || 'calendar', :'calendar_password'),
    ('notifications', :'role_prefix' || 'notifications', :'notifications_password');

-- The roles: log in, nothing more (attributes are set again on a re-run, in case they drifted).
SELECT format('CREATE ROLE %I', role_name)
FROM pg_temp.booking_services
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role_name)
\gexec

SELECT format('ALTER ROLE %I LOGIN NOCREATEDB NOCREATEROLE', role_name)
FROM pg_temp.booking_services
\gexec

-- Only a superuser may even name these (a role that is not one cannot have made them otherwise).
SELECT format('ALTER ROLE %I NOSUPERUSER NOREPLICATION NOBYPASSRLS', role_name)
FROM pg_temp.booking_services
WHERE (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
\gexec

-- Whoever runs this must belong to the roles to give them their schemas below. A superuser does;
-- a managed Postgres's admin user (CREATEROLE, owner of the database) makes itself a member.
SELECT format('GRANT %I TO %I', role_name, current_user)
FROM pg_temp.booking_services
WHERE NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
\gexec

-- The password is sent as written; keep log_statement from logging this session's DDL.
SELECT format('ALTER ROLE %I PASSWORD %L', role_name, password)
FROM pg_temp.booking_services
WHERE password <> ''
\gexec

SELECT format(
    'ALTER ROLE %I IN DATABASE %I SET search_path = %I', role_name, current_database(), schema_name
)
FROM pg_temp.booking_services
\gexec

-- The database: only the owner and these roles may connect; nobody else creates anything in it.
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database())
\gexec

SELECT format('REVOKE ALL ON DATABASE %I FROM %I', current_database(), role_name)
FROM pg_temp.booking_services
\gexec

SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), role_name)
FROM pg_temp.booking_services
\gexec

-- public: closed. Postgres 15 already takes CREATE from PUBLIC; USAGE goes too.
SELECT 'REVOKE ALL ON SCHEMA public FROM PUBLIC'
WHERE EXISTS (SELECT FROM pg_namespace WHERE nspname = 'public')
\gexec

-- btree_gist, in a schema of its own that no role can write to. Index support functions are
-- called without privilege checks, so the orders role needs no right on it.
CREATE SCHEMA IF NOT EXISTS extensions;
REVOKE ALL ON SCHEMA extensions FROM PUBLIC;
CREATE EXTENSION IF NOT EXISTS btree_gist SCHEMA extensions;

-- Each schema, owned by its role; nobody else has any right on it.
SELECT format('CREATE SCHEMA IF NOT EXISTS %I AUTHORIZATION %I', schema_name, role_name)
FROM pg_temp.booking_services
\gexec

SELECT format('ALTER SCHEMA %I OWNER TO %I', schema_name, role_name)
FROM pg_temp.booking_services
\gexec

SELECT format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', schema_name)
FROM pg_temp.booking_services
\gexec

SELECT format('REVOKE ALL ON SCHEMA %I FROM %I', s.schema_name, r.role_name)
FROM pg_temp.booking_services AS s
CROSS JOIN pg_temp.booking_services AS r
WHERE s.schema_name <> r.schema_name
\gexec

COMMIT;
