# ruff: noqa: RUF001  (real typography in the samples: en dashes, minus and multiplication signs)
"""The sample documents' text, in a small Markdown subset that `generate.py` renders per format.

Supported: `#`/`##`/`###` headings, paragraphs, `- ` and `1. ` list lines, pipe tables (header,
separator, rows) and ``` code fences. In PDFs every `##` section after the first starts a new
page. PDF text stays within Latin-1 (the core PDF fonts); the other formats may use any Unicode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Format = Literal["pdf", "md", "html", "txt"]


@dataclass(frozen=True, slots=True)
class SampleDoc:
    filename: str
    format: Format
    title: str
    body: str  # the Markdown subset above; for txt, the file's exact text
    html_title: str | None = None  # <title> for HTML, when it differs from the first heading
    encoding: str = "utf-8"


KAFKA = SampleDoc(
    "kafka-consumer-groups.pdf",
    "pdf",
    "Kafka Consumer Groups in Practice",
    """
# Kafka Consumer Groups in Practice

A consumer group is a set of consumers that cooperate to read a topic. Kafka assigns every partition of the topic to exactly one member of the group, so the members share the work and each record is processed by one of them. Adding members spreads the partitions thinner; a group can never use more members than the topic has partitions, and extra members sit idle as hot standbys.

## How partitions are assigned

When a consumer joins, it sends a JoinGroup request to the group coordinator, a broker chosen by hashing the group id onto the internal __consumer_offsets topic. One member, the group leader, runs the partition assignor and sends the resulting plan back through the coordinator.

The classic assignors are range, round robin and sticky. The range assignor places consecutive partitions of each topic on the same member, which keeps co-partitioned topics together. The sticky assignor tries to keep each partition where it was before, which matters when consumers hold local state or caches keyed by partition.

- Keys decide partitions: records with the same key always land on the same partition.
- Order is guaranteed within a partition, never across partitions.
- A partition is read by at most one member of a group at a time.

## Rebalancing without stopping the world

Before Kafka 2.4 every rebalance was eager: all members gave up all their partitions, waited for the new plan and then resumed. With hundreds of partitions this stop-the-world pause could last many seconds. The cooperative sticky assignor rebalances incrementally instead: members keep the partitions that do not move and only revoke the few that are handed to someone else.

Static membership removes another source of churn. A consumer that sets group.instance.id keeps its identity across restarts, so a rolling deploy within session.timeout.ms does not trigger any rebalance at all.

A member that does not call poll within max.poll.interval.ms is considered stuck and is removed from the group. Long-running handlers should pause their partitions and keep polling, or move the slow work elsewhere, rather than raise the interval to hours.

## Offsets and delivery guarantees

A consumer commits the offset of the next record it wants to read. Committing after processing gives at-least-once delivery: a crash between the side effect and the commit means the record is delivered again, so handlers must be idempotent. Committing before processing gives at-most-once delivery and can lose records.

| Setting | Default | Effect |
|---|---|---|
| enable.auto.commit | true | commits in the background every interval |
| auto.offset.reset | latest | where to start without a committed offset |
| isolation.level | read_uncommitted | whether to skip aborted transactional records |

For exactly-once effect across Kafka and a database, store the result and the offset in the same transaction, or make every write an upsert keyed by what makes it unique.

## Sizing a group

Measure the time one record takes and the arrival rate at peak. If a member handles 200 records per second and the topic receives 1,500 per second at peak, the group needs at least eight members, and the topic needs at least eight partitions, preferably twelve to leave headroom. Consumer lag, the distance between the log end offset and the committed offset, is the signal to watch: steady growth means the group is under-provisioned.
""",
)

PGVECTOR = SampleDoc(
    "pgvector-hnsw-indexes.pdf",
    "pdf",
    "Tuning pgvector HNSW Indexes",
    """
# Tuning pgvector HNSW Indexes

pgvector adds a vector column type to PostgreSQL and two approximate nearest neighbour index methods, IVFFlat and HNSW. HNSW, hierarchical navigable small world, builds a layered graph in which every vector is linked to a handful of close neighbours. A search enters at the sparse top layer and greedily walks towards the query, descending layer by layer until it reaches the dense bottom layer.

## Build parameters

Two parameters shape the graph. The parameter m is the number of links each node keeps per layer, 16 by default. The parameter ef_construction is the size of the candidate list used while inserting, 64 by default. Larger values give a better graph and higher recall at the cost of a slower build and a larger index.

| Parameter | Default | Raise it when |
|---|---|---|
| m | 16 | recall is too low for high-dimensional data |
| ef_construction | 64 | recall stays low even with a high ef_search |
| maintenance_work_mem | 64MB | the build log says the graph no longer fits |

Build the index after the bulk load when you can: inserting into an existing HNSW index is slower than building it once. Set max_parallel_maintenance_workers to use several cores for the build.

### Choosing the operator class

Create the index with the operator class that matches the distance in your queries: vector_cosine_ops for the <=> operator, vector_l2_ops for <-> and vector_ip_ops for the negative inner product <#>. A query that orders by a different operator cannot use the index and silently falls back to a sequential scan.

## Query time settings

The setting hnsw.ef_search is the size of the dynamic candidate list during a search, 40 by default. It bounds how many rows one index scan returns, so a query with LIMIT 100 needs an ef_search of at least 100. Raising it improves recall and costs latency; measure recall against an exact scan on a sample of real queries before settling on a value.

Filtering is the classic trap. With a WHERE clause on another column, PostgreSQL scans the index first and filters afterwards, so a selective filter can leave far fewer rows than the LIMIT. pgvector 0.8 added iterative index scans: set hnsw.iterative_scan to relaxed_order and the scan continues until enough rows pass the filter.

## Monitoring and maintenance

Check that queries use the index with EXPLAIN ANALYZE, watch the index size with pg_relation_size, and vacuum regularly: deleted vectors stay in the graph until vacuum repairs the links around them. Reindexing concurrently rebuilds a bloated graph without blocking writes.
""",
)

SOURDOUGH = SampleDoc(
    "sourdough-country-loaf.pdf",
    "pdf",
    "A Country Sourdough Loaf",
    """
# A Country Sourdough Loaf

This loaf has a crackling crust, an open and glossy crumb and a mild tang. It takes about 24 hours from feeding the starter to slicing, but only 30 minutes of that is hands-on work. The recipe makes one large loaf baked in a cast iron Dutch oven.

## Ingredients

| Ingredient | Weight | Baker's percentage |
|---|---|---|
| Bread flour | 450 g | 90% |
| Whole wheat flour | 50 g | 10% |
| Water at 30 C | 375 g | 75% |
| Active starter | 100 g | 20% |
| Fine sea salt | 10 g | 2% |

Feed the starter 4 to 6 hours before mixing so that it is bubbly, has doubled in volume and smells pleasantly sour. A spoonful of ripe starter floats in water.

## Method

1. Mix the flours with 350 g of the water until no dry flour remains, then rest for 45 minutes (the autolyse).
2. Add the starter, squeeze it through the dough, then add the salt with the remaining 25 g of water.
3. Bulk ferment at 24 to 26 C for 4 to 5 hours, with four sets of stretch and folds in the first two hours.
4. When the dough has grown by half, is domed and jiggles, turn it out, pre-shape it into a round and rest 20 minutes.
5. Shape a tight boule, place it seam side up in a floured banneton and refrigerate for 12 to 16 hours.
6. Preheat the oven with the Dutch oven inside to 250 C for 45 minutes. Score the cold dough and bake 20 minutes covered, then 25 minutes uncovered at 230 C.

Let the loaf cool for at least an hour before cutting: the crumb is still setting and slicing early makes it gummy.

## Troubleshooting

A dense crumb with a few large holes usually means under-fermentation: the bulk stage ended too early or the kitchen was cold. A flat loaf that spreads on the peel is often over-fermented, or was shaped without enough surface tension. A pale crust needs a longer uncovered bake or a hotter oven, and a crust that burns at the bottom improves with a baking sheet on the rack below the pot.
""",
)

LISBON = SampleDoc(
    "lisbon-weekend-guide.pdf",
    "pdf",
    "A Weekend in Lisbon",
    """
# A Weekend in Lisbon

Lisbon spreads over seven hills above the Tagus estuary. It is a compact city best explored on foot, as long as you wear shoes with grip: the limestone pavements called calcada are polished smooth and slippery after rain. Spring and autumn bring mild weather and fewer crowds than July and August.

## Getting around

From the airport, the red metro line reaches the centre in about 25 minutes. A rechargeable Navegante card works on the metro, trams, buses and the ferries across the river. Tram 28 rattles through Graca, Alfama and Baixa and is a sight in itself, but it is crowded by mid-morning; ride it early or walk the same route downhill.

- The Santa Justa lift links Baixa with Chiado; the viewpoint at the top is free if you walk up through the Carmo convent.
- Trains to Sintra leave from Rossio station every 20 minutes; trains to Cascais leave from Cais do Sodre.
- Taxis and ride-hailing are inexpensive for the steep climbs late at night.

## Where to eat

Start the day with a pastel de nata, a custard tart with a blistered top, still warm from the oven in Belem. For lunch, look for a tasca with a handwritten menu and order the prato do dia, the dish of the day. Grilled sardines are the taste of the June festivals, and bacalhau, salt cod, appears in hundreds of recipes.

### Evening

Dinner starts late, rarely before eight. In Alfama and Mouraria small restaurants host fado, the melancholic Portuguese song; stay silent while the fadista sings. The Time Out Market in Cais do Sodre gathers stalls from well-known chefs under one roof and is a safe choice for groups who cannot agree.

## Day trips

Sintra, forty minutes away by train, hides palaces and gardens in a cool, misty forest: the colourful Pena Palace, the Moorish Castle and the mysterious Quinta da Regaleira with its initiation well. Buy tickets online and arrive at opening time. Cascais offers beaches and a seaside promenade, and the cliffs of Cabo da Roca mark the westernmost point of mainland Europe.
""",
)

FAQ = SampleDoc(
    "backup-service-faq.md",
    "md",
    "Nimbus Backup: Frequently Asked Questions",
    """
# Nimbus Backup: Frequently Asked Questions

Nimbus Backup copies the files on your laptops and servers to encrypted cloud storage every hour, keeps every version for 90 days and lets you restore a single file or a whole machine from the web console or the `nimbus` command-line tool.

## Accounts and billing

### How is Nimbus Backup priced?

You pay per protected device and per terabyte stored. The Personal plan covers one device and 1 TB for €6 a month; the Team plan costs €9 per device a month with pooled storage of 1 TB per device. Storage beyond the allowance costs €4 per additional TB, billed monthly on what you actually used.

### Can I change plans or cancel at any time?

Yes. Upgrades take effect immediately and are prorated. When you cancel, your backups stay available for restore for 30 days, after which they are permanently deleted. We cannot recover data after that window.

### Do you offer discounts for schools and charities?

Registered non-profit organisations and accredited schools get 40% off the Team plan. Write to the billing team with proof of status.

## Backups

### What is backed up by default?

Your home folder, minus caches, temporary files and the contents of the trash. On servers, you choose the paths in `/etc/nimbus/agent.toml`. Files larger than 50 GB are skipped unless you enable large-file mode.

### Is my data encrypted?

Files are encrypted on your device with AES-256-GCM before they are uploaded, using a key derived from your recovery passphrase. We never see the passphrase. If you lose it and have not set up a recovery contact, nobody, including our support staff, can decrypt your backups.

### Does backing up slow down my computer?

The agent runs at low CPU and I/O priority and pauses when you are on battery below 20% or on a metered connection. You can cap its upload bandwidth in the settings.

## Restore

### How do I restore a deleted file?

Open the web console, pick the device, browse to the folder and choose a date from the timeline. Select the file and click Restore; it is downloaded as a zip archive. From the command line:

```
nimbus restore --device laptop-anna --path ~/Documents/report.docx --at 2024-05-02T09:00
```

### How long does a full restore take?

It depends on your connection. As a guide, restoring 500 GB over a 100 Mbit/s line takes about twelve hours. For urgent restores of more than 2 TB we can ship an encrypted drive within two business days.
""",
)

ESPRESSO = SampleDoc(
    "espresso-at-home.md",
    "md",
    "Dialling In Espresso at Home",
    """
# Dialling In Espresso at Home

Good espresso comes from controlling four variables: the dose of ground coffee, the grind size, the yield in the cup and the time the shot takes. Change one at a time and taste after every change.

## Start from a recipe

A reliable starting point for a medium roast is a ratio of 1:2. Put 18 g of coffee in the basket and aim for 36 g of liquid espresso in 25 to 30 seconds, counted from the moment you start the pump.

| Roast | Dose | Yield | Time | Water temperature |
|---|---|---|---|---|
| Light | 18 g | 40–45 g | 28–32 s | 94 °C |
| Medium | 18 g | 36 g | 25–30 s | 93 °C |
| Dark | 18 g | 30 g | 22–26 s | 90 °C |

## Adjust the grind

Grind size is the main lever. If the shot runs too fast and tastes sour, thin and salty, grind finer. If it runs too slowly and tastes bitter, dry and harsh, grind coarser. Move the grinder in small steps and purge a couple of grams after each adjustment so that you taste the new setting, not the old one.

## Prepare the puck

- Weigh every dose; volume measures vary by 10% or more.
- Break up clumps with a needle tool before tamping.
- Tamp level and firmly; the exact pressure matters less than consistency.
- Lock in the portafilter and start the shot straight away so the coffee does not bake on the hot group head.

Channelling, when water finds a crack in the puck and rushes through it, shows up as spurting jets, a pale streak in the stream and a shot that is sour and bitter at the same time.

## Milk drinks

For a flat white, steam 120 ml of cold whole milk to about 60 °C: stretch it briefly while the jug warms from cold to lukewarm, then sink the wand to spin the milk into a glossy microfoam with no visible bubbles. Tap and swirl the jug and pour into a double ristretto.
""",
)

RUNBOOK = SampleDoc(
    "postgres-failover-runbook.md",
    "md",
    "Runbook: PostgreSQL Primary Failover",
    """
# Runbook: PostgreSQL Primary Failover

Use this runbook when the primary PostgreSQL server of the orders cluster is down or unreachable and Patroni has not promoted a replica on its own within two minutes. Page the database on-call before you start and post every step in the incident channel.

## Assess

Confirm the primary is really gone rather than isolated from your own network. Check the cluster state from two different hosts:

```bash
patronictl -c /etc/patroni/orders.yml list
curl -s http://orders-db-2:8008/health
```

If the leader lock is still held, or the old primary still answers on port 5432 from inside the cluster network, stop here: promoting now risks a split brain with two writable primaries.

## Promote a replica

1. Pick the replica with the smallest replication lag; the `Lag in MB` column of `patronictl list` shows it.
2. Fence the old primary: stop the VM from the cloud console so it cannot come back as a writer.
3. Run the failover and confirm the prompt:

```bash
patronictl -c /etc/patroni/orders.yml failover --candidate orders-db-2
```

4. Wait until the new leader shows `running` and the timeline number has increased by one.

## Reconnect clients

Applications connect through PgBouncer on the virtual address `orders-db.internal`, which Patroni moves to the new leader. Check that write traffic resumes:

```sql
SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND backend_type = 'client backend';
```

If a service still fails with `cannot execute INSERT in a read-only transaction`, restart its connection pool; it is holding connections to a replica.

## Afterwards

Rebuild the old primary as a replica with `patronictl reinit` once the cause is understood, check that the nightly backup of the new primary succeeded, and write the incident review within five working days.
""",
)

SOLAR = SampleDoc(
    "solar-panel-buyers-guide.html",
    "html",
    "Buying Solar Panels for Your Home",
    """
# Buying Solar Panels for Your Home

A rooftop solar system turns daylight into electricity you use at home, and in many regions you can sell the surplus back to the grid. A typical 4 kW system on a south-facing roof in central Europe produces around 3,800 kWh a year, roughly the consumption of a family of three.

## Panel types

| Type | Typical efficiency | Price per watt | Best for |
|---|---|---|---|
| Monocrystalline | 20–23% | €0.35 | small roofs where every square metre counts |
| Polycrystalline | 15–18% | €0.28 | large roofs and tight budgets |
| Thin film | 10–13% | €0.25 | flexible or curved surfaces |

Look at the temperature coefficient as well as the headline efficiency: panels lose output on hot days, and a coefficient of −0.30%/°C loses far less in summer than one of −0.45%/°C.

## Inverters

The inverter converts the panels' direct current into alternating current for your home.

- String inverters are the cheapest option and work well on an unshaded roof facing one direction.
- Microinverters sit behind each panel, so shade on one panel does not drag down the whole string.
- Hybrid inverters can charge a home battery and keep essential circuits running during a power cut.

## Before you sign

Ask for at least three quotes that include the panel and inverter models, the expected yearly yield, the warranty terms and the installation date. Product warranties of 12 years and performance warranties guaranteeing 80% of the original output after 25 years are now standard. Check whether your roof needs repairs first: removing and refitting the panels later costs almost as much as the original installation.
""",
    html_title="Solar panel buyer's guide | Green Home Journal",
)

MARATHON = SampleDoc(
    "marathon-training-plan.html",
    "html",
    "A 16-Week Marathon Training Plan",
    """
# A 16-Week Marathon Training Plan

This plan takes a runner who can comfortably run 10 km to the start line of a marathon in sixteen weeks, with four runs a week. It builds the long run gradually, adds one quality session a week and tapers for the final three weeks.

## Weekly structure

- Tuesday: an easy run of 6 to 10 km at conversational pace.
- Thursday: the quality session, either intervals or a tempo run.
- Saturday: a short recovery run of 5 km.
- Sunday: the long run, the heart of the plan.

## Long run progression

| Week | Long run | Weekly total | Quality session |
|---|---|---|---|
| 1 | 12 km | 30 km | 6 × 400 m |
| 4 | 18 km | 40 km | 20 min tempo |
| 8 | 24 km | 50 km | 5 × 1 km |
| 12 | 32 km | 60 km | 30 min tempo |
| 16 | Race day | 42.2 km | none |

Every fourth week is a recovery week with about 20% less volume, so the body can absorb the training.

## Fuelling and hydration

Practise your race-day fuelling on long runs: take one energy gel or 30 to 60 g of carbohydrate every 40 minutes after the first hour, and drink to thirst. Eat a familiar, low-fibre breakfast three hours before the start.

## Taper and race day

In the last three weeks cut the volume to 75%, then 50%, then 30%, but keep a little speed work so your legs stay sharp. On race day, start slower than your goal pace for the first 5 km; the second half is where marathons are won or lost.
""",
    html_title="Marathon training plan: 16 weeks to race day",
)

BEES = SampleDoc(
    "beekeeping-first-year.html",
    "html",
    "Your First Year of Beekeeping",
    """
# Your First Year of Beekeeping

Keeping bees is a year-round rhythm of inspections, feeding and patience. Most new beekeepers start in spring with a nucleus colony, a small colony of five frames with a laying queen, bought from a local breeder.

## Equipment checklist

- A hive: a Langstroth or National hive with a floor, brood box, queen excluder, two supers and a roof.
- A ventilated bee suit with a veil, and gloves thin enough to handle frames gently.
- A smoker and fuel such as dry pine needles or untreated hessian.
- A hive tool to prise apart frames glued with propolis.

## Through the seasons

| Season | Main task | What to look for |
|---|---|---|
| Spring | weekly inspections | eggs, young larvae and queen cells |
| Summer | add supers as honey flows | space for nectar, signs of swarming |
| Autumn | harvest, treat for varroa | stores of at least 20 kg for winter |
| Winter | leave the colony closed | hive weight, blocked entrances |

## Swarming

Swarming is how colonies reproduce: the old queen leaves with about half of the workers. It is natural, but you lose the honey crop. Queen cells hanging along the bottom edge of the frames in May are the warning sign; splitting the colony before the swarm leaves gives you a second hive instead.

## Varroa mites

The varroa mite feeds on developing bees and spreads viruses, and an untreated colony usually dies within two or three years. Count mites on a sticky board or with an alcohol wash every month and treat in late summer, after the honey harvest, with an approved product such as oxalic acid.
""",
)

RELEASE_NOTES = SampleDoc(
    "release-notes-2-4.txt",
    "txt",
    "Harbor Sync 2.4 release notes",
    """Harbor Sync 2.4 release notes
=============================

Released 14 March. Harbor Sync keeps folders in sync between laptops, servers and object storage.

New features
------------

Selective sync: choose which subfolders of a shared folder are downloaded to each device. Folders you leave out still show in the file list and are fetched on demand when you open a file.

Bandwidth schedules: limit upload and download speed by time of day, for example 2 Mbit/s during office hours and unlimited at night.

Conflict preview: when the same file was edited on two devices, the conflict dialog now shows both versions side by side before you choose which one to keep.

Changes
-------

The minimum supported macOS version is now 12. Windows 8.1 is no longer supported.
The sync engine now hashes files with BLAKE3 instead of SHA-1, which makes the first scan of a large folder about three times faster.
Log files rotate at 50 MB and at most five old files are kept.

Fixed issues
------------

Renaming a folder that contained more than 10,000 files no longer triggers a full re-upload.
Files with a trailing space in their name are now synced correctly to Windows devices.
The tray icon no longer stays on "Syncing" after the network connection drops and comes back.

Upgrade notes
-------------

Upgrade the server before the clients: 2.4 clients can talk to 2.3 servers, but selective sync needs a 2.4 server. The first start after the upgrade migrates the local index and may take a few minutes on folders with millions of files.
""",
)

HOUSEPLANTS = SampleDoc(
    "houseplant-care.txt",
    "txt",
    "Houseplant care",
    """HOUSEPLANT CARE NOTES

Light
Most houseplants come from the floor of tropical forests and want bright, indirect light. A metre or two from a south or west window is ideal for a monstera or a fiddle-leaf fig. Snake plants and ZZ plants tolerate dim corners, but they grow slowly there. Cacti and succulents want direct sun for at least four hours a day.

Watering
More houseplants die from overwatering than from anything else. Push a finger into the compost: water only when the top 2-3 cm are dry, then water thoroughly until it runs out of the drainage holes, and empty the saucer after half an hour. In winter, when growth slows, most plants need water half as often. Yellow, soft lower leaves and a sour smell from the pot mean the roots are sitting in water.

Temperature and humidity
Keep tropical plants between 18 and 27 °C and away from radiators and cold draughts. Calatheas, ferns and other thin-leaved plants like humidity above 50%: group them together or stand them on a tray of wet pebbles. Misting helps for a few minutes only.

Feeding and repotting
Feed with a balanced liquid fertiliser at half strength every two weeks from March to September, not in winter. Repot in spring when roots circle the bottom of the pot or grow out of the drainage holes, into a pot only 2-5 cm wider than the old one.

Pests
Check the undersides of leaves when you water. Fine webbing points to spider mites, white cottony tufts to mealybugs, and tiny flies above the compost to fungus gnats, which breed in compost that stays wet. Wipe leaves with a cloth dipped in mild soapy water and isolate an infested plant until it is clean.
""",
    encoding="latin-1",
)

TRAVEL_POLICY = SampleDoc(
    "travel-expense-policy.txt",
    "txt",
    "Travel and expense policy",
    """Travel and Expense Policy (effective 1 January)

1. Purpose
This policy explains which business travel costs the company pays and how to claim them. It applies to all employees and contractors travelling on company business.

2. Booking travel
Book flights, trains and hotels through the company travel portal at least 14 days ahead when possible. Economy class is the standard for flights under six hours; premium economy is allowed for longer flights. For trips under 500 km, take the train unless it is more than two hours slower than flying.

3. Hotels
The nightly limit is 150 EUR in most cities and 220 EUR in London, Paris, New York, Zurich and Tokyo, including taxes and breakfast. Stays longer than five nights should use serviced apartments where they are cheaper.

4. Meals and per diems
Meals are covered by a daily allowance instead of receipts: 45 EUR per full travel day and 25 EUR for the day of departure and return. Alcohol is not reimbursed, except at client dinners approved in advance by your manager.

5. Claiming expenses
Submit claims within 30 days of returning, with a photo of every receipt over 10 EUR, through the expense app. Claims are reimbursed with the next monthly salary payment. Lost receipts need a signed statement and your manager's approval.

6. Exceptions
Anything not covered here needs written approval from your manager and the finance team before you spend the money.
""",
)

DOCS: Final[tuple[SampleDoc, ...]] = (
    KAFKA,
    PGVECTOR,
    SOURDOUGH,
    LISBON,
    FAQ,
    ESPRESSO,
    RUNBOOK,
    SOLAR,
    MARATHON,
    BEES,
    RELEASE_NOTES,
    HOUSEPLANTS,
    TRAVEL_POLICY,
)
# (copy's filename, the original it duplicates byte for byte)
DUPLICATES: Final[tuple[tuple[str, str], ...]] = (("backup-service-faq-copy.md", FAQ.filename),)
