-- The default schema of a region: one row per Machine, written by the host that runs it.
-- Hosts re-publish the whole row on every change (INSERT ... ON CONFLICT (id) DO UPDATE);
-- a re-publish that changes nothing records nothing and sends nothing.
CREATE TABLE machines (
    id TEXT NOT NULL PRIMARY KEY,
    app TEXT NOT NULL DEFAULT '',
    region TEXT NOT NULL DEFAULT '',
    host TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'created',
    address TEXT,
    port INTEGER,
    image TEXT,
    version INTEGER NOT NULL DEFAULT 0,
    updated INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE INDEX machines_app ON machines (app, state);
CREATE INDEX machines_host ON machines (host);
