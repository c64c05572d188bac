-- The typed event the gate parsed, as JSON, so that handlers get it without parsing the body
-- again (NULL for deliveries gated before this column existed: they are parsed again).
ALTER TABLE deliveries ADD COLUMN event TEXT;
