// kinesalite on 127.0.0.1 only (its CLI has no host flag): node kinesalite.js PORT
// Streams are created in 50 ms instead of 500; data is kept in memory.
const port = parseInt(process.argv[2], 10);
require('kinesalite')({ createStreamMs: 50, deleteStreamMs: 50, updateStreamMs: 50, shardLimit: 100 })
  .listen(port, '127.0.0.1', (err) => {
    if (err) { console.error(err); process.exit(1); }
    console.log(`kinesalite listening on 127.0.0.1:${port}`);
  });
