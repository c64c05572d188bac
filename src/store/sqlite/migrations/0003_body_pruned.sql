-- 1 once retention dropped the body of a delivery whose row is kept.
ALTER TABLE deliveries ADD COLUMN body_pruned INTEGER NOT NULL DEFAULT 0;
