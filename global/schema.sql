-- The global tier's schema: what each region publishes about itself.
-- One row per (app, region): how many Machines of the app run there, by state.
CREATE TABLE app_regions (
    app TEXT NOT NULL,
    region TEXT NOT NULL,
    machines INTEGER NOT NULL DEFAULT 0,
    started INTEGER NOT NULL DEFAULT 0,
    stopped INTEGER NOT NULL DEFAULT 0,
    other INTEGER NOT NULL DEFAULT 0,
    updated INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app, region)
) STRICT;

-- One row per region: where its API is, which schema it runs, when it last published.
CREATE TABLE regions (
    region TEXT NOT NULL PRIMARY KEY,
    endpoints TEXT NOT NULL DEFAULT '',
    schema_version TEXT NOT NULL DEFAULT '',
    last_publish INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE INDEX app_regions_region ON app_regions (region);
